"""SparseSGD's compact (int8) momentum: the code's error bound, updates against float32, checkpoints, config."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from partial_fc.comm import SingleProcessCommunicator
from partial_fc.engine.checkpoint import TrainingParts, load_checkpoint, save_checkpoint
from partial_fc.engine.config import load_config
from partial_fc.engine.trainer import Trainer, build_optimizers
from partial_fc.errors import InputError
from partial_fc.heads import ArcFace, PartialFC, SparseSGD
from partial_fc.heads.sparse_sgd import INT8_LEVELS, center_sgd, decode_int8_rows, encode_int8_rows
from tests.engine.test_checkpoint import FirstOfMany
from tests.launchers import REPO, launch, worker
from tests.workers.checkpoint_job import CLASSES, DIM, build, train_step

COMM = SingleProcessCommunicator()


def round_trip(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoded values, codes, row maxima) of `values` through the int8 code."""
    codes = torch.empty(values.shape, dtype=torch.int8)
    row_max = encode_int8_rows(values, codes, torch.empty_like(values))
    return decode_int8_rows(codes, row_max, torch.empty_like(values), torch.empty_like(values)), codes, row_max


def momentum_like_rows(rows: int = 512, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows of Gaussian and heavy-tailed values over 12 orders of magnitude, one row of zeros."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, width, generator=generator)
    chi_square = torch.randn(rows // 2, width, 3, generator=generator).square().sum(dim=2)
    values[::2] /= (chi_square / 3).sqrt()  # Student's t with 3 degrees of freedom: heavy tails
    values *= torch.logspace(-9, 3, rows).unsqueeze(1)
    values[7] = 0.0
    return values


def test_int8_code_error_is_within_its_bound_and_small_values_keep_relative_precision():
    values = momentum_like_rows()
    decoded, codes, row_max = round_trip(values)
    assert codes.min() >= -INT8_LEVELS and codes.max() <= INT8_LEVELS
    largest = values.abs().amax(dim=1, keepdim=True)
    assert torch.equal(row_max, largest.squeeze(1))
    # |v' - v| <= sqrt(|v| a) / 127 + a / (4 * 127^2), a the row's largest |v| (plus float rounding)
    bound = (values.abs() * largest).sqrt() / INT8_LEVELS + largest / (4 * INT8_LEVELS**2)
    assert ((decoded - values).abs() <= bound * (1 + 1e-5)).all()
    assert torch.equal(decoded[7], torch.zeros_like(decoded[7]))
    assert torch.allclose(decoded.abs().amax(dim=1), row_max, rtol=1e-6, atol=0)  # the row's maximum is kept
    relative = (decoded - values).abs() / values.abs()
    nonzero = values != 0
    assert relative[nonzero & (values.abs() >= 1e-2 * largest)].max() < 0.081  # 10/127 + 100/64516
    assert relative[nonzero & (values.abs() >= 1e-1 * largest)].max() < 0.026
    assert not ((decoded == 0) & nonzero & (values.abs() >= 1e-4 * largest)).any()  # none above 1e-4 a flushes
    rms = ((decoded - values).norm(dim=1) / values.norm(dim=1).clamp_min(1e-45))[values.norm(dim=1) > 0]
    assert rms.mean() < 0.012  # about 0.7% of a Gaussian row's norm, 1% of a heavy-tailed one's


def test_rows_too_small_to_scale_are_stored_as_zero():
    values = torch.tensor([[1e-35, -2e-35], [0.0, -3.5], [2.0, 2.0]])
    decoded, codes, _ = round_trip(values)
    assert torch.equal(decoded[0], torch.zeros(2)) and torch.isfinite(decoded).all()
    assert codes.tolist() == [[0, 0], [0, -INT8_LEVELS], [INT8_LEVELS, INT8_LEVELS]]
    assert torch.allclose(decoded[1:], torch.tensor([[0.0, -3.5], [2.0, 2.0]]), rtol=1e-6, atol=0)


def trained_head(
    momentum_dtype: str,
    steps: int,
    storage_dtype=torch.float32,
    update_in_backward: bool = True,
    classes: int = 400,
    dim: int = 32,
):
    """A head trained `steps` steps on fixed random data (the same for every momentum_dtype), its start, losses."""
    head = PartialFC(
        ArcFace(s=16.0), dim, classes, sample_rate=0.5, comm=COMM, seed=1, chunk_rows=64, storage_dtype=storage_dtype
    )
    start = head.weight.clone()
    optimizer = SparseSGD(
        head,
        lr=0.5,
        momentum=0.9,
        weight_decay=5e-4,
        update_in_backward=update_in_backward,
        momentum_dtype=momentum_dtype,
    )
    generator = torch.Generator().manual_seed(2)
    prototypes = torch.randn(classes, dim, generator=generator)
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, classes, (48,), generator=generator)
        embeddings = prototypes[labels] + torch.randn(48, dim, generator=generator)
        loss = head(embeddings, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return head, optimizer, start, losses


def decoded_momentum(optimizer: SparseSGD) -> torch.Tensor:
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    codes = state["momentum_code"]
    out = torch.empty(codes.shape)
    return decode_int8_rows(codes, state["momentum_absmax"], out, torch.empty_like(out))


def test_int8_momentum_updates_stay_close_to_the_float32_reference():
    reference, reference_optimizer, start, reference_losses = trained_head("storage", 40)
    head, optimizer, same_start, losses = trained_head("int8", 40)
    assert torch.equal(start, same_start)
    state = optimizer.state[head.weight]
    assert sorted(state) == ["momentum_absmax", "momentum_code"] and state["momentum_code"].dtype == torch.int8
    assert state["momentum_code"].shape == head.weight.shape and state["momentum_absmax"].shape == (400,)
    moved = (reference.weight - start).norm()
    assert (head.weight - reference.weight).norm() < 0.03 * moved  # measured 0.8%
    momentum = reference_optimizer.state[reference.weight]["momentum_buffer"]
    assert (decoded_momentum(optimizer) - momentum).norm() < 0.05 * momentum.norm()  # measured 1.7%
    assert max(abs(a - b) / b for a, b in zip(losses, reference_losses)) < 5e-3  # measured 0.11%
    assert losses[-1] < 0.9 * losses[0]


def test_int8_momentum_is_the_same_updated_in_backward_or_in_step_and_with_bfloat16_centers():
    in_backward, optimizer, _, losses = trained_head("int8", 6)
    in_step, step_optimizer, _, step_losses = trained_head("int8", 6, update_in_backward=False)
    assert losses == step_losses and torch.equal(in_backward.weight, in_step.weight)
    for key in ("momentum_code", "momentum_absmax"):
        assert torch.equal(optimizer.state[in_backward.weight][key], step_optimizer.state[in_step.weight][key])
    bf16, bf16_optimizer, start, _ = trained_head("int8", 6, storage_dtype=torch.bfloat16)
    reference, *_ = trained_head("storage", 6, storage_dtype=torch.bfloat16)
    assert bf16.weight.dtype == torch.bfloat16 and bf16_optimizer.state[bf16.weight]["momentum_code"].any()
    assert (bf16.weight.float() - reference.weight.float()).norm() < 0.03 * (
        reference.weight.float() - start.float()
    ).norm()


def test_storage_momentum_is_unchanged_and_no_momentum_keeps_no_state():
    """Also `center_sgd`, as a run asks for the centers' SGD: "none" is plain SGD with no state."""
    head = PartialFC(ArcFace(), 8, 20, comm=COMM, storage_dtype=torch.bfloat16)
    default = SparseSGD(head, lr=0.1)
    assert list(default.state[head.weight]) == ["momentum_buffer"]
    assert default.state[head.weight]["momentum_buffer"].dtype == torch.bfloat16
    plain = SparseSGD(PartialFC(ArcFace(), 8, 20, comm=COMM), lr=0.1, momentum=0.0, momentum_dtype="int8")
    assert not plain.state
    with pytest.raises(ValueError, match="momentum_dtype='float8' must be one of storage, int8"):
        SparseSGD(PartialFC(ArcFace(), 8, 20, comm=COMM), lr=0.1, momentum_dtype="float8")
    none = center_sgd(PartialFC(ArcFace(), 8, 20, comm=COMM), 0.1, 0.9, 5e-4, True, "none")
    assert not none.state and none.param_groups[0]["momentum"] == 0.0
    with pytest.raises(ValueError, match="momentum_dtype='float8' must be one of storage, int8, none"):
        center_sgd(PartialFC(ArcFace(), 8, 20, comm=COMM), 0.1, 0.9, 5e-4, True, "float8")


def test_config_selects_the_centers_momentum_and_refuses_it_with_adamw():
    backbone = nn.Linear(4, 8)
    for kind, keys in (("storage", ["momentum_buffer"]), ("int8", ["momentum_absmax", "momentum_code"]), ("none", [])):
        cfg = load_config(None, [f"momentum_dtype={kind}", "embedding_size=8", "num_classes=20"], environ={})
        body, centers = build_optimizers(cfg, backbone, PartialFC(ArcFace(), 8, 20, comm=COMM))
        assert sorted(centers.state[centers.param_groups[0]["params"][0]]) == keys, kind
        assert body.param_groups[0]["momentum"] == 0.9
        assert centers.param_groups[0]["momentum"] == (0.0 if kind == "none" else 0.9)
    assert load_config(None, environ={}).momentum_dtype == "storage"
    with pytest.raises(
        InputError, match="momentum_dtype = 'int8' .from --set momentum_dtype=int8. applies to optimizer = 'sgd' only"
    ):
        load_config(None, ["optimizer=adamw", "momentum_dtype=int8"], environ={})


@pytest.mark.parametrize("kind, state_gib", [("int8", 2000 * (16 + 4) / 1024**3), ("none", 0.0)])
def test_bench_head_runs_the_compact_and_the_plain_momentum(kind, state_gib):
    from partial_fc.perf.memory import estimate_head_memory

    options = "--backend single --classes 2000 --dim 16 --batch 8 --steps 1 --reference-repeats 1".split()
    job = subprocess.run(
        [sys.executable, "-m", "partial_fc", "bench", "head", *options, "--momentum-dtype", kind],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["momentum_dtype"] == kind and result["step_s"] > 0
    estimate = estimate_head_memory(2000, 16, 8, 1.0, 1, "float32", kind)
    assert estimate.optimizer_state / 1024**3 == pytest.approx(state_gib)


def small_trainer(output: Path, *overrides: str) -> Trainer:
    cfg = load_config(
        "synthetic",
        [
            "rec=synthetic",
            f"output={output}",
            "num_classes=30",
            "num_image=64",
            "batch_size=16",
            "embedding_size=16",
            "val_targets=[]",
            "num_workers=0",
            "network=plain_nano",
            "num_epoch=1",
            "warmup_epoch=0",
            *overrides,
        ],
        environ={},
    )
    return Trainer(cfg, COMM)


def test_a_resume_config_initialises_the_centers_only_when_it_loads_none(tmp_path):
    fresh = small_trainer(tmp_path / "fresh")
    assert not fresh.centers_pending
    fresh.close()
    waiting = small_trainer(tmp_path / "auto", "resume=auto", "momentum_dtype=int8")
    assert waiting.centers_pending  # left for the checkpoint to fill, not written twice
    waiting.resume()  # none there: initialised as a fresh run's
    assert not waiting.centers_pending and torch.equal(waiting.head.weight, fresh.head.weight)
    assert sorted(waiting.head_optimizer.state[waiting.head.weight]) == ["momentum_absmax", "momentum_code"]
    waiting.close()
    never = small_trainer(tmp_path / "never", "resume=auto")
    never._initialise_pending_centers()  # what fit() does first when resume() was not called
    assert torch.equal(never.head.weight, fresh.head.weight)
    never.close()


# ------------------------------------------------------------------------------------------------ checkpoints


def shard_with_int8_sgd(start: int, end: int, momentum_dtype: str = "int8", momentum: float = 0.9):
    """The class range [start, end) of the checkpoint job's head, with a SparseSGD whose state is still zero."""
    weight = torch.zeros(end - start, DIM)
    head = SimpleNamespace(
        weight=weight,
        workspace=torch.empty(8, DIM),
        row_updater=None,
        class_start=start,
        num_local=end - start,
        num_classes=CLASSES,
        embedding_size=DIM,
        generator=torch.Generator(),
    )
    return head, SparseSGD(head, lr=0.2, momentum=momentum, momentum_dtype=momentum_dtype)


def saved_int8_checkpoint(root: Path, steps: int = 3):
    setup = build(COMM, momentum_dtype="int8")
    for _ in range(steps):
        train_step(setup)
    path = save_checkpoint(root, setup.parts(), comm=COMM, step=steps, epoch=setup.sampler.epoch)
    return setup, path


def with_head(setup, head: PartialFC, optimizer: SparseSGD) -> TrainingParts:
    """`setup`'s backbone and its optimizer with another head, without a scheduler or sampler."""
    return TrainingParts(
        backbone=setup.backbone, backbone_optimizer=setup.backbone_optimizer, head=head, head_optimizer=optimizer
    )


def test_int8_state_reshards_bit_exactly_and_continues_exactly(tmp_path):
    setup, path = saved_int8_checkpoint(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["row_state"] == ["momentum_absmax", "momentum_code"]
    saved = {key: value.clone() for key, value in setup.head_optimizer.state[setup.head.weight].items()}
    saved_centers = setup.head.weight.clone()
    assert saved["momentum_code"].any() and (saved["momentum_absmax"] > 0).any()
    continued = [train_step(setup) for _ in range(2)]  # before any load re-seeds the generators
    for start, end in ((0, 17), (17, 34), (34, 50), (10, 45)):
        head, optimizer = shard_with_int8_sgd(start, end)
        load_checkpoint(
            path,
            with_head(setup, head, optimizer),
            comm=FirstOfMany(3),
        )
        loaded = optimizer.state[head.weight]
        assert torch.equal(head.weight, saved_centers[start:end])
        for key in ("momentum_code", "momentum_absmax"):
            assert loaded[key].dtype == saved[key].dtype and torch.equal(loaded[key], saved[key][start:end]), key
    resumed = build(COMM, seed=5, momentum_dtype="int8")
    load_checkpoint(path, resumed.parts(), comm=COMM)
    assert [train_step(resumed) for _ in range(2)] == continued
    assert torch.equal(setup.head.weight, resumed.head.weight)
    for key in ("momentum_code", "momentum_absmax"):
        assert torch.equal(
            setup.head_optimizer.state[setup.head.weight][key], resumed.head_optimizer.state[resumed.head.weight][key]
        )


def rewrite_centers(path: Path, change) -> None:
    """Change the saved centers file with `change(data)` and make the manifest agree, so only the content is bad."""
    manifest = json.loads((path / "manifest.json").read_text())
    name = manifest["centers"][0]["file"]
    data = torch.load(path / name, weights_only=True)
    change(data)
    torch.save(data, path / name)
    manifest["files"][name] = {
        "size": (path / name).stat().st_size,
        "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest(),
    }
    manifest["row_state"] = sorted(data["row_state"])
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "storage into int8",
            r"saved as \['momentum_buffer'\], this one keeps \['momentum_absmax', 'momentum_code'\]: "
            "resume with the optimizer, momentum and momentum_dtype it was saved with",
        ),
        ("int8 into storage", r"saved as \['momentum_absmax', 'momentum_code'\], this one keeps \['momentum_buffer'\]"),
        ("int8 into none", r"saved as \['momentum_absmax', 'momentum_code'\], this one keeps nothing"),
        ("float codes", "per-row optimizer state 'momentum_code' is float32, the head optimizer keeps it as int8"),
        (
            "narrow codes",
            r"per-row optimizer state 'momentum_code' has rows of shape \(4,\), the head optimizer's has "
            r"\(8,\)",
        ),
    ],
)
def test_a_checkpoint_whose_momentum_does_not_fit_is_a_clear_error(tmp_path, case, message):
    saved_as = "storage" if case == "storage into int8" else "int8"
    setup = build(COMM, momentum_dtype=saved_as)
    train_step(setup)
    path = save_checkpoint(tmp_path, setup.parts(), comm=COMM, step=1, epoch=0)
    if case == "float codes":
        rewrite_centers(
            path, lambda data: data["row_state"].update(momentum_code=data["row_state"]["momentum_code"].float())
        )
    if case == "narrow codes":
        rewrite_centers(
            path,
            lambda data: data["row_state"].update(momentum_code=data["row_state"]["momentum_code"][:, :4].contiguous()),
        )
    into = {"storage into int8": "int8", "int8 into storage": "storage"}.get(case, "int8")
    head, optimizer = shard_with_int8_sgd(0, CLASSES, into, momentum=0.0 if case == "int8 into none" else 0.9)
    with pytest.raises(InputError, match=message):
        load_checkpoint(
            path,
            with_head(setup, head, optimizer),
            comm=COMM,
        )


def job(ranks: int, out: Path, *arguments: str) -> dict:
    out.mkdir()
    result = launch(
        "mpirun",
        ranks,
        [worker("checkpoint_job.py"), "--out", str(out), "--momentum-dtype", "int8", *arguments],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(out / "result.pt")


def assert_same_momentum(got: dict, want: dict) -> None:
    for key in ("centers", "momentum_code", "momentum_absmax"):
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
@pytest.mark.mpi
def test_int8_state_saved_on_2_ranks_loads_bit_exactly_on_1_and_3(tmp_path):
    root = tmp_path / "two"
    uninterrupted = job(2, tmp_path / "a", "--steps", "4", "--save-at", "2", "--save-root", str(root))
    saved = uninterrupted["saved"][2]
    assert "momentum" not in saved and saved["momentum_code"].dtype == torch.int8 and saved["momentum_code"].any()
    assert saved["momentum_code"].shape == (CLASSES, DIM) and saved["momentum_absmax"].shape == (CLASSES,)
    on_three = job(3, tmp_path / "b", "--resume", str(root))
    assert on_three["state"]["resharded"]
    assert_same_momentum(on_three["loaded"], saved)
    on_one = job(1, tmp_path / "c", "--resume", str(root), "--steps", "3")
    assert on_one["state"]["resharded"] and math.isfinite(on_one["losses"][3])
    assert_same_momentum(on_one["loaded"], saved)
    resumed = job(2, tmp_path / "d", "--resume", str(root), "--steps", "4")
    assert resumed["losses"] == {3: uninterrupted["losses"][3], 4: uninterrupted["losses"][4]}
    assert_same_momentum(resumed["final"], uninterrupted["final"])
