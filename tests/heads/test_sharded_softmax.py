"""The logits buffer lent from step to step: reused after a backward or a no-grad forward, never shared by two
graphs alive at once, and a second forward before the first's backward gives the gradients of one at a time."""

import torch

from partial_fc.heads import ArcFace, PartialFC, SparseSGD
from partial_fc.heads.sharded_softmax import ReusedBuffer


def _head(single, seed: int = 3) -> PartialFC:
    return PartialFC(ArcFace(s=16.0), 8, 40, 0.5, comm=single, seed=seed, chunk_rows=4)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=generator, requires_grad=True), torch.randint(0, 40, (6,), generator=generator)


def _lent_address(head: PartialFC) -> int:
    return head.logits_buffer._free.data_ptr()


def test_each_step_reuses_the_buffer_of_the_step_before(single):
    head = _head(single)
    optimizer = SparseSGD(head, lr=0.1)
    addresses = []
    for step in range(3):
        head(*_batch(step)).backward()
        optimizer.step()
        addresses.append(_lent_address(head))
    assert addresses[0] == addresses[1] == addresses[2]
    with torch.no_grad():
        head(*_batch(5))  # no backward will come: handed back at once
    assert _lent_address(head) == addresses[0]


def test_a_buffer_lent_out_is_not_lent_again_and_a_small_one_is_replaced():
    buffer, like = ReusedBuffer(), torch.empty(0)
    first = buffer.borrow((3, 4), like)
    second = buffer.borrow((3, 4), like)  # the first is still out: a fresh one
    assert first.data_ptr() != second.data_ptr()
    buffer.give_back(first)
    assert buffer.borrow((2, 5), like).data_ptr() == first.data_ptr()  # fits in the first's 12 elements
    buffer.give_back(first)
    bigger = buffer.borrow((4, 4), like)
    assert bigger.shape == (4, 4) and bigger.data_ptr() != first.data_ptr()
    buffer.give_back(bigger)
    assert buffer.borrow((1, 1), torch.empty(0, dtype=torch.float64)).dtype == torch.float64


def test_two_forwards_before_one_backward_get_the_gradients_of_one_at_a_time(single):
    """(loss1 + loss2).backward() must not see the second forward's logits in the first's buffer."""
    together, apart = _head(single), _head(single)
    (x1, y1), (x2, y2) = _batch(1), _batch(2)
    (together(x1, y1) + together(x2, y2)).backward()
    a1, a2 = x1.detach().clone().requires_grad_(True), x2.detach().clone().requires_grad_(True)
    apart(a1, y1).backward()
    apart(a2, y2).backward()
    assert torch.allclose(x1.grad, a1.grad, rtol=1e-6, atol=1e-9)
    assert torch.allclose(x2.grad, a2.grad, rtol=1e-6, atol=1e-9)
    for got, want in zip(together.take_sampled(), apart.take_sampled()):
        assert torch.equal(got.index, want.index) and torch.allclose(got.grad, want.grad, rtol=1e-6, atol=1e-9)
