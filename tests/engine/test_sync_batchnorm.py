"""SyncBatchNorm in one process, and the conversion of a network's BatchNorm layers.

Its multi-rank equality with plain BatchNorm on the whole batch is proven in tests/engine/test_distributed.py.
"""

import pytest
import torch
from torch import nn

from partial_fc.backbones import get_model
from partial_fc.engine.distributed import distribute_backbone
from partial_fc.engine.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, global_moments


def test_conversion_keeps_the_tensors_names_and_mode(single):
    model = get_model("r10_nano", num_features=16)
    before = dict(model.state_dict(keep_vars=True))
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    converted = convert_sync_batchnorm(model, single)
    assert converted is model and not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert len(layers) == count > 0 and not any(layer.training for layer in layers)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[key] is before[key] for key in before)
    assert model.features.weight.requires_grad is False  # IResNet's frozen feature scale stays frozen
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("shape, layer", [((6, 4), nn.BatchNorm1d), ((5, 3, 4, 4), nn.BatchNorm2d)])
def test_one_process_is_plain_batchnorm_in_training_and_eval(single, shape, layer):
    torch.manual_seed(0)
    plain = layer(shape[1], momentum=None)
    nn.init.normal_(plain.weight)
    synced = convert_sync_batchnorm(nn.Sequential(layer(shape[1], momentum=None)), single)
    synced.load_state_dict({f"0.{k}": v for k, v in plain.state_dict().items()})
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float32, requires_grad=True)
        x_synced = x.detach().clone().requires_grad_(True)
        (plain(x) * torch.arange(x.numel()).view(shape)).sum().backward()
        (synced(x_synced) * torch.arange(x.numel()).view(shape)).sum().backward()
        assert torch.equal(x.grad, x_synced.grad)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), synced.state_dict().values()))
    plain.eval(), synced.eval()
    x = torch.randn(shape)
    assert torch.equal(plain(x), synced(x))


def test_global_moments_of_one_rank_are_the_batch_moments(single):
    x = torch.randn(7, 3, 5, 2, dtype=torch.float64) * 10 + 1000  # a large mean: no sum-of-squares cancellation
    mean, var, total = global_moments(x, single)
    assert total.tolist() == [70.0] * 3
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-10, atol=0)


def test_distribute_backbone_converts_on_request(single):
    model = get_model("r10_nano", num_features=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    same = distribute_backbone(model, optimizer, single).module
    assert same is model and not any(isinstance(m, SyncBatchNorm) for m in model.modules())
    distribute_backbone(model, optimizer, single, sync_batchnorm=True)
    assert any(isinstance(m, SyncBatchNorm) for m in model.modules())


def test_a_single_value_per_channel_is_refused_on_one_rank_as_batchnorm_does(single):
    layer = SyncBatchNorm(3, single)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
