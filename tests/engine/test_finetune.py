"""Fine-tuning a trained backbone on a new label set: init_weights, freeze_backbone_steps, backbone_lr_mult, and
the errors that point a misused `resume` at init_weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from partial_fc.backbones.weights import load_backbone_state
from partial_fc.comm.single import SingleProcessCommunicator
from partial_fc.engine.checkpoint import backbone_weights_file
from partial_fc.engine.config import load_config
from partial_fc.engine.schedule import PolyWarmupSchedule
from partial_fc.engine.trainer import Trainer
from tests.cli_helpers import assert_one_error, call
from tests.eval.test_ijb import train_backbone
from tests.launchers import launch
from tests.train_runs import call_quiet, checkpoint_tensors, settings, summary

BACKBONE_PREFIX = "backbone."
UNVERIFIED = dict(val_targets="")  # runs whose verification nobody reads skip it (most of a short run's time)


def backbone_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every backbone parameter and buffer (BatchNorm statistics and their counters) a checkpoint holds."""
    return {
        key[len(BACKBONE_PREFIX) :]: value
        for key, value in checkpoint_tensors(checkpoint).items()
        if key.startswith(BACKBONE_PREFIX)
    }


@pytest.fixture(scope="module")
def trained(faceset, tmp_path_factory) -> Path:
    """A checkpoint of a short run on the 40 identities of `faceset` (its backbone is what fine-tuning starts from)."""
    output = tmp_path_factory.mktemp("trained")
    assert call_quiet("train", *settings(faceset, output, batch_size=64, **UNVERIFIED)) == 0  # 5 steps
    return output / "checkpoints"


def test_lr_mults_scale_each_optimizer_on_the_shared_schedule():
    body, centers = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    schedule = PolyWarmupSchedule([body, centers], 0.4, total_steps=4, warmup_steps=1, lr_mults=[0.1, 1.0])
    seen = []
    for _ in range(4):
        seen += [body.param_groups[0]["lr"], centers.param_groups[0]["lr"]]
        schedule.step()
    assert seen == pytest.approx([0.04, 0.4, 0.04, 0.4, 0.04 * 2 / 3, 0.4 * 2 / 3, 0.04 / 3, 0.4 / 3])


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_frozen_steps_leave_every_backbone_tensor_and_its_optimizer_untouched(faceset, trained, tmp_path, ranks):
    """3 frozen steps of 6 (global batch 48, checkpoints every 3): at step 3 the backbone (weights, BatchNorm
    statistics and counters) is the loaded one and its optimizer holds no state; the centers did train; after 6 it
    has moved."""
    argv = settings(
        faceset,
        tmp_path / "out",
        num_classes=50,
        num_epoch=1,
        checkpoint_every=3,
        init_weights=trained,
        freeze_backbone_steps=3,
        backbone_lr_mult=0.1,
        batch_size=48 // ranks,
        **UNVERIFIED,
    )
    if ranks == 1:
        assert call_quiet("train", *argv) == 0
    else:
        job = launch("mpirun", 2, ["-m", "partial_fc", "train", *argv], timeout=300)
        assert job.returncode == 0, job.stderr
    start = load_backbone_state(backbone_weights_file(trained))
    steps = tmp_path / "out" / "checkpoints"
    frozen, moved = backbone_tensors(steps / "step_00000003"), backbone_tensors(steps / "step_00000006")
    assert set(frozen) == set(start) and any("running_var" in key for key in start)
    assert all(torch.equal(frozen[key], value) for key, value in start.items())
    assert torch.load(steps / "step_00000003" / "backbone_optimizer.pt")["state"] == {}
    assert any(not torch.equal(moved[key], value) for key, value in start.items() if "running_mean" in key)
    assert any(not torch.equal(moved[key], value) for key, value in start.items() if key.endswith("weight"))
    row_state = [
        value for key, value in checkpoint_tensors(steps / "step_00000003").items() if key.startswith("centers.")
    ]
    assert row_state and all(value.abs().sum() > 0 for value in row_state)  # the centers' optimizer did step


def test_a_fine_tuning_run_reports_the_freeze_and_the_backbone_rate(faceset, trained, tmp_path, capsys):
    overrides = settings(
        faceset,
        tmp_path / "out",
        num_classes=50,
        init_weights=trained,
        freeze_backbone_steps=2,
        backbone_lr_mult=0.25,
        batch_size=64,
        **UNVERIFIED,
    )[1::2]
    trainer = Trainer(load_config("synthetic", overrides, environ={}), SingleProcessCommunicator())
    try:
        assert trainer.backbone_frozen
        assert trainer.backbone_optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * 0.05)
        assert trainer.head_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
        result = trainer.fit()
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert result.steps == 5 and not trainer.backbone_frozen
    assert "backbone frozen until step 2" in out and "step 2: backbone unfrozen, learning rate x0.25" in out


def test_resume_pointed_at_weights_or_another_label_set_suggests_init_weights(faceset, trained, tmp_path, capsys):
    weights = tmp_path / "published" / "backbone.pth"
    weights.parent.mkdir()
    torch.save(load_backbone_state(backbone_weights_file(trained)), weights)
    for target in (weights, weights.parent):
        status, _, err = call(capsys, "train", *settings(faceset, tmp_path / "a"), "--set", f"resume={target}")
        assert_one_error(
            status,
            err,
            f"resume={target}",
            "no partial_fc checkpoint but backbone.pth" if target.is_dir() else "is a file, not a checkpoint folder",
            f"init_weights={weights}",
        )
    status, _, err = call(
        capsys, "train", *settings(faceset, tmp_path / "b", num_classes=50), "--set", f"resume={trained}"
    )
    assert_one_error(status, err, "checkpoint has num_classes=40", "num_classes=50", "init_weights=")
    status, _, err = call(
        capsys, "train", *settings(faceset, tmp_path / "c", num_classes=50), "--set", f"resume={tmp_path / 'nowhere'}"
    )
    assert_one_error(status, err, "nowhere", "holds no complete checkpoint")
    status, out, err = call(
        capsys,
        "train",
        *settings(faceset, tmp_path / "d", num_epoch=2, batch_size=64, **UNVERIFIED),
        "--set",
        f"resume={trained}",
    )
    assert status == 0, err
    assert "at step 5" in out and summary(out)["steps"] == 10  # a checkpoint folder elsewhere continues as usual


@pytest.mark.slow
def test_fine_tuning_a_released_backbone_beats_training_from_scratch(faceset, tmp_path, capsys):
    """A backbone trained elsewhere (other rendered identities), fine-tuned for one epoch on `faceset`'s identities,
    against the same epoch from random weights: verification on `faceset`'s held-out identities."""
    released = tmp_path / "backbone.pth"
    torch.save(train_backbone(steps=200).state_dict(), released)
    runs = {"scratch": {}, "fine-tuned": dict(init_weights=released, freeze_backbone_steps=3, backbone_lr_mult=0.3)}
    accuracy = {}
    for name, extra in runs.items():
        status, out, err = call(capsys, "train", *settings(faceset, tmp_path / name, network="plain_nano", **extra))
        assert status == 0, err
        accuracy[name] = summary(out)["verification"]["synthetic"]
    assert accuracy["fine-tuned"] >= accuracy["scratch"] + 0.2, accuracy  # measured: 0.82 against 0.54
