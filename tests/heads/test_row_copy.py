"""The C row copies against torch's index_select / index_copy_: every dtype the head keeps, the bfloat16 <->
float32 conversions, the int8 momentum pass against SparseSGD's torch ops, bad indexes, the fallbacks (disabled,
no compiler, several threads), concurrent builds, and whole optimizer steps bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from partial_fc.comm import SingleProcessCommunicator
from partial_fc.heads import ArcFace, PartialFC, SparseAdamW, SparseSGD, row_copy
from partial_fc.heads.row_copy import (
    native_rows_available,
    put_rows,
    take_rows,
    update_int8_momentum,
    update_sgd_rows,
)
from partial_fc.heads.sparse_sgd import INT8_LEVELS, INT8_SMALLEST_ROW_MAX, encode_int8_rows
from tests.launchers import REPO

pytestmark = pytest.mark.skipif(not native_rows_available(), reason="no C compiler to build the row copies")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _table(dtype: torch.dtype, rows: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(rows, width, generator=generator).to(dtype)
    return torch.randint(-128, 128, (rows, width), generator=generator).to(dtype)


@pytest.mark.parametrize(
    "dtype, width",
    [
        (torch.float32, 512),
        (torch.float64, 7),
        (torch.bfloat16, 64),
        (torch.float16, 3),
        (torch.int8, 16),
        (torch.int8, 12),
        (torch.int64, 5),
    ],
)
def test_native_copies_equal_torchs(one_thread, dtype, width):
    table = _table(dtype, 1000, width, seed=1)
    index = torch.randperm(1000, generator=torch.Generator().manual_seed(2))[:300]  # unsorted, with gaps
    out = torch.empty(300, width, dtype=dtype)
    assert row_copy._routine(row_copy._TAKE, table, index, out) is not None  # the C routine is under test
    assert torch.equal(take_rows(table, index, out), table.index_select(0, index))
    rows = _table(dtype, 300, width, seed=3)
    expected = table.clone().index_copy_(0, index, rows)
    put_rows(table, index, rows)
    assert torch.equal(table, expected)


def _bfloat16_edge_cases() -> torch.Tensor:
    """float32 values whose bfloat16 rounding is delicate: ties to even both ways, carries into the exponent,
    overflow to infinity, subnormals, signed zeros, infinities and NaNs, then ordinary random values."""
    bits = torch.tensor(
        [
            0x3F808000,
            0x3F818000,
            0x3F807FFF,
            0x3F808001,
            0x3FFF8000,
            0x7F7F8000,
            0x7F7FFFFF,
            0x00008000,
            0x00018000,
            0x0000FFFF,
            0x80000000,
            0x00000000,
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0xFFC00001,
            0x7F800001,
            0x807F8000,
        ],
        dtype=torch.int64,
    )
    special = bits.to(torch.int32).view(torch.float32)  # two's-complement int32 of the bit patterns
    values = torch.randn(1000 * 64 - special.numel(), generator=torch.Generator().manual_seed(8)) * 1e3
    return torch.cat([special, values]).reshape(1000, 64)


def test_bfloat16_conversions_round_as_torch_does(one_thread):
    values = _bfloat16_edge_cases()
    index = torch.randperm(1000, generator=torch.Generator().manual_seed(9))[:400]
    table = torch.zeros(1000, 64, dtype=torch.bfloat16)
    assert row_copy._routine(row_copy._PUT, table, index, values[:400]) is not None
    put_rows(table, index, values[:400])
    expected = torch.zeros(1000, 64, dtype=torch.bfloat16).index_copy_(0, index, values[:400].to(torch.bfloat16))
    finite = ~expected.isnan()
    assert torch.equal(table.isnan(), ~finite)  # NaN stays NaN (torch's vector and scalar code differ in its bits)
    assert torch.equal(table.view(torch.int16)[finite], expected.view(torch.int16)[finite])
    widened = torch.empty(400, 64)
    assert row_copy._routine(row_copy._TAKE, table, index, widened) is not None
    take_rows(table, index, widened)
    reference = table.index_select(0, index).float()
    assert torch.equal(widened.view(torch.int32), reference.view(torch.int32))  # exact, NaN payloads included


def _int8_momentum_by_torch(codes, row_max, index, grad, momentum):
    """SparseSGD's torch ops for the int8 momentum step, on copies: (velocity, codes, row_max) afterwards."""
    codes, row_max = codes.clone(), row_max.clone()
    velocity, scratch = torch.empty_like(grad), torch.empty_like(grad)
    gain = row_max.index_select(0, index).mul_(momentum / INT8_LEVELS**2)
    velocity.copy_(codes.index_select(0, index))
    torch.abs(velocity, out=scratch).mul_(gain.unsqueeze(1))
    torch.addcmul(grad, velocity, scratch, out=velocity)
    new_codes = torch.empty(grad.shape, dtype=torch.int8)
    row_max.index_copy_(0, index, encode_int8_rows(velocity, new_codes, scratch))
    codes.index_copy_(0, index, new_codes)
    return velocity, codes, row_max


def test_the_int8_momentum_pass_equals_sparse_sgds_torch_ops(one_thread):
    generator = torch.Generator().manual_seed(10)
    codes = torch.randint(-127, 128, (500, 48), generator=generator).to(torch.int8)
    row_max = torch.rand(500, generator=generator) * 10
    index = torch.randperm(500, generator=generator)[:200]
    grad = torch.randn(200, 48, generator=generator) * 0.1
    codes[index[0]] = 0  # a row with no momentum yet and no gradient: stays zero (below the smallest row max)
    row_max[index[0]] = 0
    grad[0] = 0
    grad[1] = 1e-35  # a row whose velocity is below the smallest row max: its code is zero
    row_max[index[1]] = 0
    expected = _int8_momentum_by_torch(codes, row_max, index, grad, 0.9)
    velocity = torch.empty_like(grad)
    assert update_int8_momentum(
        codes, row_max, index, grad, 0.9 / INT8_LEVELS**2, INT8_LEVELS**2, INT8_SMALLEST_ROW_MAX, velocity
    )
    for got, want in zip((velocity, codes, row_max), expected):
        assert torch.equal(got, want)
    assert not codes[index[:2]].any() and row_max[index[0]] == 0


def test_the_int8_momentum_pass_checks_its_indexes_and_declines_what_it_cannot_do(one_thread):
    codes, row_max, grad = torch.ones(10, 8, dtype=torch.int8), torch.ones(10), torch.ones(2, 8)
    with pytest.raises(IndexError, match=r"row index 10 \(position 1\) is outside the table's 10 rows"):
        update_int8_momentum(codes, row_max, torch.tensor([0, 10]), grad, 1e-4, 16129.0, 1e-30, torch.empty(2, 8))
    assert torch.equal(codes, torch.ones(10, 8, dtype=torch.int8)) and torch.equal(row_max, torch.ones(10))
    index = torch.tensor([0, 1])
    assert not update_int8_momentum(
        codes, row_max, index, grad.double(), 1e-4, 16129.0, 1e-30, torch.empty(2, 8, dtype=torch.float64)
    )  # float64 shards: torch's ops
    torch.set_num_threads(2)
    assert not update_int8_momentum(codes, row_max, index, grad, 1e-4, 16129.0, 1e-30, torch.empty(2, 8))


def _sgd_rows_by_torch(table, velocity_table, index, rows, grad, lr, momentum, weight_decay):
    """SparseSGD's torch ops for one chunk, on copies: (table, velocity_table) afterwards."""
    table, grad, rows = table.clone(), grad.clone(), rows.clone()
    if weight_decay:
        grad.add_(rows, alpha=weight_decay)
    if velocity_table is not None:
        velocity_table = velocity_table.clone()
        velocity = torch.add(grad, velocity_table.index_select(0, index).float(), alpha=momentum)
        velocity_table.index_copy_(0, index, velocity.to(velocity_table.dtype))
        grad = velocity
    table.index_copy_(0, index, rows.add_(grad, alpha=-lr).to(table.dtype))
    return table, velocity_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4)])
def test_the_sgd_pass_equals_sparse_sgds_torch_ops(one_thread, dtype, momentum, weight_decay):
    generator = torch.Generator().manual_seed(11)
    table = torch.randn(400, 40, generator=generator).to(dtype)
    velocity_table = torch.randn(400, 40, generator=generator).to(dtype) if momentum else None
    index = torch.randperm(400, generator=generator)[:150]
    rows = table.index_select(0, index).float()
    grad = torch.randn(150, 40, generator=generator) * 0.1
    rows[0, :3] = torch.tensor([torch.inf, -torch.inf, torch.nan])  # kept as torch keeps them: no decay at 0
    expected = _sgd_rows_by_torch(table, velocity_table, index, rows, grad, 0.1, momentum, weight_decay)
    velocity = torch.empty_like(grad)
    assert update_sgd_rows(table, velocity_table, index, rows, grad, velocity, 0.1, momentum, weight_decay)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for got, want in zip((table, velocity_table), expected):
        assert (got is None) == (want is None)
        if got is not None:  # NaN stays NaN (torch's vector and scalar bfloat16 code differ in its bits)
            number = ~want.isnan()
            assert torch.equal(got.isnan(), ~number) and torch.equal(got.view(bits)[number], want.view(bits)[number])


def test_the_sgd_pass_checks_its_indexes_and_declines_what_it_cannot_do(one_thread):
    table, velocity_table, rows, grad = torch.ones(10, 8), torch.ones(10, 8), torch.ones(2, 8), torch.ones(2, 8)
    velocity = torch.empty(2, 8)
    with pytest.raises(IndexError, match=r"row index -1 \(position 0\) is outside the table's 10 rows"):
        update_sgd_rows(table, velocity_table, torch.tensor([-1, 3]), rows, grad, velocity, 0.1, 0.9, 0.0)
    assert torch.equal(table, torch.ones(10, 8)) and torch.equal(velocity_table, torch.ones(10, 8))
    index = torch.tensor([0, 1])
    doubles = (table.double(), velocity_table.double(), index, rows.double(), grad.double(), velocity.double())
    assert not update_sgd_rows(*doubles, 0.1, 0.9, 0.0)  # float64 shards: torch's ops
    assert not update_sgd_rows(table, velocity_table.bfloat16(), index, rows, grad, velocity, 0.1, 0.9, 0.0)
    torch.set_num_threads(2)
    assert not update_sgd_rows(table, velocity_table, index, rows, grad, velocity, 0.1, 0.9, 0.0)


def test_one_dimensional_tables_and_empty_indexes(one_thread):
    table = torch.arange(10, dtype=torch.float32)
    index = torch.tensor([7, 0, 3])
    assert torch.equal(take_rows(table, index, torch.empty(3)), torch.tensor([7.0, 0.0, 3.0]))
    put_rows(table, index, torch.tensor([-1.0, -2.0, -3.0]))
    assert table[[7, 0, 3]].tolist() == [-1.0, -2.0, -3.0]
    empty = torch.empty(0, dtype=torch.int64)
    assert take_rows(table, empty, torch.empty(0)).numel() == 0
    put_rows(table, empty, torch.empty(0))


@pytest.mark.parametrize("bad", [1000, -1])
def test_a_bad_index_is_named_and_nothing_is_written(one_thread, bad):
    table = _table(torch.float32, 1000, 8, seed=4)
    before = table.clone()
    index = torch.tensor([5, 6, bad, 7])
    with pytest.raises(IndexError, match=rf"row index {bad} \(position 2\) is outside the table's 1000 rows"):
        take_rows(table, index, torch.empty(4, 8))
    with pytest.raises(IndexError, match=rf"row index {bad} \(position 2\)"):
        put_rows(table, index, torch.zeros(4, 8))
    assert torch.equal(table, before)


def test_torchs_ops_run_where_the_routines_do_not_apply(one_thread):
    table = _table(torch.float16, 100, 8, seed=5)
    index = torch.tensor([3, 1, 4])
    converting = torch.empty(3, 8)  # float16 rows into a float32 workspace: no routine converts those
    assert row_copy._routine(row_copy._TAKE, table, index, converting) is None
    assert torch.equal(take_rows(table, index, converting), table[index].float())
    put_rows(table, index, torch.ones(3, 8))
    assert torch.equal(table[index], torch.ones(3, 8, dtype=torch.float16))
    torch.set_num_threads(2)
    assert row_copy._routine(row_copy._TAKE, table, index, torch.empty(3, 8, dtype=torch.float16)) is None
    strided = _table(torch.float32, 100, 16, seed=6)[:, ::2]
    assert row_copy._routine(row_copy._TAKE, strided, index, torch.empty(3, 8)) is None


def _availability(env: dict) -> str:
    code = (
        "from partial_fc.heads.row_copy import native_rows_available, take_rows; import torch; "
        "torch.set_num_threads(1); t = torch.arange(12.).reshape(6, 2); "
        "print(native_rows_available(), take_rows(t, torch.tensor([5, 0]), torch.empty(2, 2)).tolist())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_disabled_or_without_a_compiler_the_results_are_the_same(tmp_path):
    expected = "[[10.0, 11.0], [0.0, 1.0]]"
    assert _availability({"PARTIAL_FC_NATIVE_ROWS": "0"}) == f"False {expected}"
    assert (
        _availability({"CC": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)})
        == f"False {expected}"
    )
    assert _availability({"XDG_CACHE_HOME": str(tmp_path)}) == f"True {expected}"


def test_ranks_building_at_once_all_get_the_library(tmp_path):
    code = "from partial_fc.heads.row_copy import native_rows_available; assert native_rows_available()"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path)}
    builds = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE) for _ in range(4)]
    for build in builds:
        assert build.wait(timeout=120) == 0, build.stderr.read()
    built = sorted(path.name for path in (tmp_path / "partial_fc" / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("row_copy-") and built[0].endswith(".so")


def _train(optimizer_kind: str, storage_dtype: torch.dtype) -> list[torch.Tensor]:
    comm = SingleProcessCommunicator()
    head = PartialFC(ArcFace(), 32, 600, 0.3, comm=comm, storage_dtype=storage_dtype, seed=1, chunk_rows=64)
    if optimizer_kind == "adamw":
        optimizer = SparseAdamW(head, lr=1e-3)
    else:
        optimizer = SparseSGD(head, lr=0.1, momentum_dtype="int8" if optimizer_kind == "sgd-int8" else "storage")
    generator = torch.Generator().manual_seed(7)
    for _ in range(4):
        embeddings = torch.randn(24, 32, generator=generator, requires_grad=True)
        head(embeddings, torch.randint(0, 600, (24,), generator=generator)).backward()
        optimizer.step()
    return [head.weight.clone(), *(state.clone() for state in optimizer.state[head.weight].values())]


@pytest.mark.parametrize(
    "optimizer_kind, storage_dtype",
    [
        ("sgd", torch.float32),
        ("sgd-int8", torch.bfloat16),
        ("sgd", torch.bfloat16),
        ("adamw", torch.float32),
        ("adamw", torch.bfloat16),
        ("sgd", torch.float64),
    ],
)
def test_optimizer_steps_are_bit_identical_with_and_without_the_routines(
    one_thread, monkeypatch, optimizer_kind, storage_dtype
):
    native = _train(optimizer_kind, storage_dtype)
    monkeypatch.setattr(row_copy, "_library", lambda: None)
    reference = _train(optimizer_kind, storage_dtype)
    assert len(native) == len(reference) > 1
    for got, expected in zip(native, reference):
        assert torch.equal(got, expected)


def test_a_native_write_counts_as_an_in_place_change(one_thread):
    """The head refuses a backward after its centers were written since forward; a C write must count as one."""
    head = PartialFC(ArcFace(), 16, 100, 0.5, comm=SingleProcessCommunicator(), seed=1)
    embeddings = torch.randn(8, 16, requires_grad=True)
    loss = head(embeddings, torch.arange(8))
    version = head.weight._version
    put_rows(head.weight, torch.tensor([3]), torch.zeros(1, 16))
    assert head.weight._version > version
    with pytest.raises(RuntimeError, match="centers changed between forward and backward"):
        loss.backward()
