"""The sharded softmax's C passes against float64, and the head through them against the float64 reference."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from partial_fc.heads import ArcFace, CombinedMargin, CosFace, PartialFC, SparseSGD, sharded_softmax, softmax_kernels
from partial_fc.heads.softmax_kernels import (
    FLUSHED_BOUND,
    exponentiate_chunk,
    native_softmax_usable,
    remove_radial,
)
from tests.numerics import TOLERANCE, relative_error
from tests.reference import make_problem, reference_cosines, reference_run
from tests.workers.head_variants import build_head, run_steps

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert native_softmax_usable(torch.zeros(1)), "the C passes must build here"
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def taken_paths(monkeypatch) -> list[str]:
    """Which exponentials each forward used: 'fixed' (the C passes) or 'max' (torch's ops, per-row shift)."""
    paths = []
    fixed, exact = sharded_softmax._exponentials_fixed_shift, sharded_softmax._exponentials_max_shift

    def spy_fixed(*args):
        result = fixed(*args)
        paths.append("fixed" if result is not None else "fixed declined")
        return result

    def spy_exact(*args):
        paths.append("max")
        return exact(*args)

    monkeypatch.setattr(sharded_softmax, "_exponentials_fixed_shift", spy_fixed)
    monkeypatch.setattr(sharded_softmax, "_exponentials_max_shift", spy_exact)
    return paths


def test_the_chunk_pass_matches_float64(one_thread):
    rows, cols, shift, limit = 70, 37, 24.0, 20.0  # 70 rows: three row groups, the last one short
    generator = torch.Generator().manual_seed(4)
    block = torch.empty(rows, cols).uniform_(-60.0, 40.0, generator=generator)
    block[5, 3], block[6, 4] = math.nan, -math.inf
    row_scale = torch.empty(rows).uniform_(0.5, 1.5, generator=generator)
    scaled = block * row_scale.unsqueeze(1)  # the pass's own float32 product, entry for entry
    positives = torch.tensor([2 * cols + 7, 40 * cols + 0, 69 * cols + 36])
    original = block.clone()
    positive_logits = torch.empty(3)
    totals = torch.zeros(3, cols)
    totals[0] = 1.0  # the pass adds to what is there
    exponentiate_chunk(block, row_scale, shift, limit, positives, positive_logits, totals, torch.empty(cols))

    assert torch.equal(positive_logits, scaled.view(-1)[positives])
    shifted = (scaled - shift).double()
    too_similar = scaled > limit
    flushed = (shifted < -87.0) & (shifted > -math.inf) & ~too_similar
    expected = shifted.exp().masked_fill(too_similar | flushed, 0.0)
    expected.view(-1)[positives] = 0.0
    got = block.double()
    assert got[5, 3].isnan() and totals[0, 3].isnan()
    finite = ~expected.isnan()
    assert (got[finite & (expected == 0)] == 0).all()
    kept = finite & (expected > 0)
    assert ((got[kept] - expected[kept]).abs() / expected[kept]).max() < 5e-7
    assert got[6, 4] == 0.0 and not flushed[6, 4]
    flushed.view(-1)[positives] = False  # a positive's entry is taken out before the exponential
    too_similar.view(-1)[positives] = False
    assert torch.equal(totals[1], too_similar.sum(dim=0).float())
    assert torch.equal(totals[2], flushed.sum(dim=0).float())
    assert 0 < int(totals[1].sum()) and 0 < int(totals[2].sum())
    sums = expected.nan_to_num(0.0).sum(dim=0) + 1.0
    columns = torch.arange(cols) != 3
    assert relative_error(totals[0, columns], sums[columns]) < 1e-6
    assert not torch.equal(block, original)


def test_the_exponential_is_accurate_across_its_range(one_thread):
    x = torch.linspace(-86.99, 0.0, 100_003).view(1, -1)
    out = x.clone()
    totals = torch.zeros(3, x.shape[1])
    exponentiate_chunk(
        out,
        torch.ones(1),
        0.0,
        math.inf,
        torch.zeros(0, dtype=torch.int64),
        torch.empty(0),
        totals,
        torch.empty(x.shape[1]),
    )
    expected = x.double().exp()
    assert ((out.double() - expected).abs() / expected).max() < 3e-7
    assert totals[2].sum() == 0 and FLUSHED_BOUND == pytest.approx(math.exp(-87.0), rel=1e-15)


@pytest.mark.parametrize("dim", [64, 23])
def test_removing_the_radial_part_matches_float64(one_thread, dim):
    generator = torch.Generator().manual_seed(dim)
    grad, centers = torch.randn(37, dim, generator=generator), torch.randn(37, dim, generator=generator)
    squared_inverse_norms = centers.square().sum(dim=1, keepdim=True).reciprocal()
    expected = grad.double() - centers.double() * (
        (grad.double() * centers.double()).sum(dim=1, keepdim=True) * squared_inverse_norms.double()
    )
    remove_radial(grad, centers, squared_inverse_norms)
    assert relative_error(grad, expected) < 1e-6
    assert (grad.double() * centers.double()).sum(dim=1).abs().max() < 1e-4


MARGINS = [CosFace(s=16.0, margin=0.35), CombinedMargin(s=16.0, m1=0.9, m2=0.4, m3=0.15), ArcFace(s=64.0)]


@pytest.mark.parametrize("margin", MARGINS, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("update_in_backward", [True, False])
def test_the_head_through_the_c_passes_matches_the_reference(
    one_thread, taken_paths, single, margin, threshold, update_in_backward
):
    problem = make_problem(1, classes=13, dim=8, steps=3, seed=5)
    expected = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3, threshold=threshold)
    if threshold:
        unfiltered = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3)
        assert all(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(expected, unfiltered))
    head = build_head(problem, single, torch.float32, margin, threshold)
    optimizer = SparseSGD(
        head, problem.lr, problem.momentum, problem.weight_decay, update_in_backward=update_in_backward
    )
    tolerance = TOLERANCE["torch.float32"]
    for got, want in zip(run_steps(head, optimizer, problem, 0), expected):
        assert abs(got["loss"] - want["loss"]) <= tolerance * want["loss"]
        assert relative_error(got["grad"], want["grad"]) < tolerance
        assert relative_error(got["centers"], want["centers"]) < tolerance
    assert taken_paths == ["fixed"] * 3


def test_rows_far_below_s_take_the_exact_shift(one_thread, taken_paths, single):
    """At s=256 the fixed shift is 216: a batch row whose cosines all stay under 0.45 has every exponential
    under float's range, so the forward declines the fixed shift and shifts by each row's maximum."""
    problem = make_problem(1, classes=13, dim=8, steps=2, seed=5)
    margin = CosFace(s=256.0, margin=0.1)
    cosines = reference_cosines(problem.embeddings[0], problem.centers)
    assert (cosines.max(dim=1).values < 0.45).any()
    expected = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3)
    head = build_head(problem, single, torch.float32, margin, 0.0)
    optimizer = SparseSGD(head, problem.lr, problem.momentum, problem.weight_decay)
    tolerance = TOLERANCE["torch.float32"]
    for got, want in zip(run_steps(head, optimizer, problem, 0), expected):
        assert abs(got["loss"] - want["loss"]) <= tolerance * want["loss"]
        assert relative_error(got["grad"], want["grad"]) < tolerance
    assert taken_paths[:2] == ["fixed declined", "max"]


def test_where_the_passes_do_not_apply_torchs_ops_run(one_thread):
    assert not native_softmax_usable(torch.zeros(2, dtype=torch.float64))
    assert not native_softmax_usable(torch.zeros(4, 2)[:, :1])
    torch.set_num_threads(2)
    assert not native_softmax_usable(torch.zeros(2))
    code = (
        "import torch; torch.set_num_threads(1); from partial_fc.heads.softmax_kernels import native_softmax_usable; "
        "print(native_softmax_usable(torch.zeros(2)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PARTIAL_FC_NATIVE_SOFTMAX": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_with_two_threads_the_head_runs_torchs_ops(taken_paths, single):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head = PartialFC(ArcFace(), 8, 40, 0.5, comm=single)
        head(torch.randn(6, 8), torch.arange(6)).backward()
    finally:
        torch.set_num_threads(threads)
    assert taken_paths == ["max"]


VARIANT_FLAGS = {"AVX-512": ("-mavx512f",), "AVX2": ("-mavx2", "-mfma"), "x86-64": ()}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the variants are x86-64's")
def test_every_variant_rounds_alike(one_thread):
    """The AVX-512, AVX2 and plain builds give the same bits, entries, sums and counts, as the loaded one."""
    generator = torch.Generator().manual_seed(9)
    block = torch.empty(75, 41).uniform_(-110.0, 60.0, generator=generator)
    row_scale = torch.empty(75).uniform_(0.5, 1.5, generator=generator)
    grad, centers = torch.randn(9, 70, generator=generator), torch.randn(9, 70, generator=generator)
    squared_inverse_norms = torch.rand(9, generator=generator)

    def run(library) -> list[torch.Tensor]:
        out, totals, positive_logits, scratch = block.clone(), torch.zeros(3, 41), torch.empty(2), torch.empty(41)
        positives = torch.tensor([3, 41 * 70 + 5])
        library.pfc_exp_chunk(
            out.data_ptr(), 75, 41, row_scale.data_ptr(), 24.0, 50.0, positives.data_ptr(), 2,
            positive_logits.data_ptr(), *(t.data_ptr() for t in totals), scratch.data_ptr(),
        )  # fmt: skip
        projected = grad.clone()
        library.pfc_remove_radial(projected.data_ptr(), centers.data_ptr(), 9, 70, squared_inverse_norms.data_ptr())
        return [out, totals, positive_logits, projected]

    loaded = run(softmax_kernels._library())
    assert loaded[1][1].sum() > 0 and loaded[1][2].sum() > 0  # some filtered, some flushed
    for name, flags in VARIANT_FLAGS.items():
        variant = softmax_kernels.build_library(("-DPFC_ONE_VARIANT", *flags))
        assert variant is not None, name
        for got, want in zip(run(variant), loaded):
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), name
