"""The CUDA paths: the head against the float64 reference on the GPU, fp16 matmuls, training under fp16 autocast
with the GradScaler and channels-last, bfloat16 storage and autocast.

Skipped without CUDA. `PARTIAL_FC_TEST_DEVICE=cpu` runs them on the CPU instead (`benchmarks/gpu.sh --dry-run`
does), where the head's reduced-precision matmuls are bfloat16 and a CPU GradScaler stands in for CUDA's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from partial_fc.comm.single import SingleProcessCommunicator
from partial_fc.engine.config import load_config
from partial_fc.engine.trainer import Trainer
from partial_fc.heads import ArcFace, CombinedMargin, CosFace, PartialFC, SparseSGD
from tests.numerics import relative_error
from tests.reference import make_problem, reference_run

DEVICE = torch.device(os.environ.get("PARTIAL_FC_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA (PARTIAL_FC_TEST_DEVICE=cpu runs these on the CPU)",
)


class DeviceCommunicator(SingleProcessCommunicator):
    """One process on DEVICE."""

    @property
    def device(self) -> torch.device:
        return DEVICE


@pytest.fixture
def comm() -> DeviceCommunicator:
    return DeviceCommunicator()


@pytest.mark.parametrize(
    "margin",
    [ArcFace(s=16.0), CosFace(s=16.0, margin=0.35), CombinedMargin(s=16.0, m1=0.9, m2=0.4, m3=0.15)],
    ids=["arcface", "cosface", "combined"],
)
@pytest.mark.parametrize(
    "storage_dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("update_in_backward", [True, False], ids=["update_in_backward", "update_in_step"])
def test_head_on_the_device_matches_the_float64_reference(comm, margin, storage_dtype, tolerance, update_in_backward):
    problem = make_problem(1, classes=300, dim=32, steps=3, seed=11)
    expected = reference_run(problem, margin.s, margin.m1, margin.m2, margin.m3)
    head = PartialFC(margin, 32, 300, comm=comm, storage_dtype=storage_dtype, chunk_rows=64)
    assert head.weight.device.type == DEVICE.type
    head.weight.copy_(problem.centers.to(DEVICE))
    optimizer = problem.sparse_sgd(head, update_in_backward=update_in_backward)
    for embeddings, labels, want in zip(problem.embeddings, problem.labels, expected):
        embeddings = embeddings.to(DEVICE, head.working_dtype).requires_grad_(True)
        loss = head(embeddings, labels.to(DEVICE))
        loss.backward()
        optimizer.step()
        assert abs(loss.item() - want["loss"]) <= tolerance * want["loss"]
        assert relative_error(embeddings.grad.cpu(), want["grad"]) < tolerance * 10
        assert relative_error(head.weight.cpu(), want["centers"]) < tolerance * 10


def _one_step(head: PartialFC, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    embeddings = embeddings.clone().requires_grad_(True)
    loss = head(embeddings, labels)
    loss.backward()
    return loss.item(), embeddings.grad


@pytest.mark.parametrize(
    "storage_dtype, fp16",
    [(torch.float32, True), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
    ids=["fp16_matmuls", "bf16_storage", "fp16_storage", "bf16_storage_fp16_matmuls"],
)
def test_reduced_precision_on_the_device_stays_close_to_float32(comm, storage_dtype, fp16):
    """fp16 matmuls (float16 on CUDA, bfloat16 on the CPU) and bf16/fp16 storage: close to the float32 head,
    not equal."""
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(64, 128, generator=generator).to(DEVICE)
    labels = torch.randint(0, 5000, (64,), generator=generator).to(DEVICE)
    exact = PartialFC(ArcFace(), 128, 5000, comm=comm, chunk_rows=1024)
    reduced = PartialFC(ArcFace(), 128, 5000, fp16=fp16, comm=comm, storage_dtype=storage_dtype, chunk_rows=1024)
    reduced.weight.copy_(exact.weight)
    (loss_exact, grad_exact), (loss_reduced, grad_reduced) = (
        _one_step(head, embeddings, labels) for head in (exact, reduced)
    )
    assert grad_reduced.dtype == torch.float32 and grad_reduced.device.type == DEVICE.type
    assert abs(loss_reduced - loss_exact) < 2e-2 * loss_exact
    assert 0 < relative_error(grad_reduced, grad_exact) < 5e-2


def test_sampled_rows_alone_move_on_the_device(comm):
    head = PartialFC(CosFace(), 64, 4000, sample_rate=0.1, comm=comm, storage_dtype=torch.bfloat16)
    optimizer = SparseSGD(head, lr=0.5)
    before = head.weight.clone()
    labels = torch.arange(0, 4000, 125, device=DEVICE)
    head(torch.randn(labels.numel(), 64, device=DEVICE), labels).backward()
    optimizer.step()
    momentum = optimizer.state[head.weight]["momentum_buffer"]
    sampled = momentum.ne(0).any(dim=1)
    assert momentum.dtype == torch.bfloat16 and momentum.device.type == DEVICE.type
    assert sampled[labels].all() and int(sampled.sum()) == head.num_sample  # every positive, 400 rows in all
    moved = (head.weight != before).any(dim=1)
    assert moved[labels].all() and not (moved & ~sampled).any()  # (a negative's step may round away in bf16)


STEPS = 3


def _train(tmp_path: Path, name: str, scaler: bool = False, **settings) -> tuple[Trainer, object, list[float]]:
    values = dict(
        rec="synthetic",
        network="r10_nano",
        embedding_size=32,
        batch_size=8,
        num_classes=50,
        num_image=8 * STEPS,
        num_epoch=1,
        warmup_epoch=0,
        sample_rate=0.5,
        num_workers=0,
        frequent=1,
        verbose=1000,
        val_targets="[]",
        output=tmp_path / name,
        lr=0.05,
    )
    values.update(settings)
    trainer = Trainer(
        load_config("synthetic", [f"{key}={value}" for key, value in values.items()], environ={}), DeviceCommunicator()
    )
    if scaler and DEVICE.type == "cpu":  # CUDA's is made by the trainer itself for fp16 on a GPU
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    result = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, result, [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def float32_losses(tmp_path_factory) -> list[float]:
    _, result, losses = _train(tmp_path_factory.mktemp("float32"), "run")
    assert result.steps == STEPS
    return losses


def test_fp16_autocast_channels_last_training_with_the_grad_scaler(tmp_path, float32_losses):
    exact_losses = float32_losses
    trainer, result, losses = _train(
        tmp_path, "fp16", scaler=True, fp16="true", amp_dtype="float16", channels_last="true"
    )
    assert trainer.scaler is not None and trainer.amp_dtype == torch.float16
    assert result.steps == STEPS and result.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == STEPS
    assert abs(losses[0] - exact_losses[0]) < 2e-2 * exact_losses[0]  # the same start, in half precision
    assert trainer.scaler.get_scale() > 0
    if DEVICE.type == "cuda":
        first = next(trainer.raw_backbone.parameters())
        assert first.is_cuda and first.dim() != 4 or first.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_training_has_no_scaler_and_tracks_float32(tmp_path, float32_losses):
    exact_losses = float32_losses
    trainer, result, losses = _train(tmp_path, "bf16", fp16="true", amp_dtype="bfloat16", storage_dtype="bfloat16")
    assert trainer.scaler is None and trainer.amp_dtype == torch.bfloat16
    assert result.steps == STEPS and result.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - exact_losses[0]) < 5e-2 * exact_losses[0]
