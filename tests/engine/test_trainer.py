"""The training application end to end: real `partial-fc train` jobs on generated face sets.

Multi-rank jobs run under mpirun (torch.distributed) and horovodrun; single-process jobs run in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import pytest
import torch

from partial_fc.backbones import get_model
from partial_fc.comm.single import SingleProcessCommunicator
from partial_fc.data.recordio import IndexedRecordReader, IndexedRecordWriter
from partial_fc.engine.config import load_config
from partial_fc.engine.run_lock import Owner, read_owner, write_owner
from partial_fc.engine.schedule import PolyWarmupSchedule
from partial_fc.engine.trainer import Trainer
from partial_fc.errors import InputError
from tests import mounts
from tests.cli_helpers import assert_one_error, call
from tests.launchers import REPO, launch, require, start, wait_for_step
from tests.numerics import relative_error
from tests.train_runs import (
    IDENTITIES,
    PER_ID,
    call_quiet,
    checkpoint_tensors,
    losses,
    metrics,
    settings,
    summary,
    train_argv,
)


def test_schedule_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = PolyWarmupSchedule([optimizer], 0.4, total_steps=10, warmup_steps=2, power=2.0)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    expected = [0.2, 0.4] + [0.4 * (1 - k / 8) ** 2 for k in range(8)]
    assert seen == pytest.approx(expected) and schedule.lr == 0.0
    restored = PolyWarmupSchedule([optimizer], 0.4, total_steps=10, warmup_steps=2, power=2.0)
    restored.load_state_dict({"last_step": 5})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected[5])
    with pytest.raises(InputError, match="warmup_steps"):
        PolyWarmupSchedule([optimizer], 0.1, total_steps=3, warmup_steps=3)


def test_single_process_run_learns_evaluates_and_checkpoints(faceset, tmp_path, capsys):
    status, out, err = call(
        capsys,
        "train",
        *settings(faceset, tmp_path, num_epoch=2, warmup_epoch=1, verbose=10, gradient_acc=2, batch_size=8),
    )
    assert status == 0, err
    result = summary(out)
    curve = losses(tmp_path)
    assert result["steps"] == 40 and sorted(curve) == list(range(1, 41))  # 320 / (8 x 2) steps per epoch
    assert curve[40] < 0.8 * curve[1]
    assert set(result["best_verification"]) == {"synthetic"} and 0.5 <= result["best_verification"]["synthetic"] <= 1
    assert Path(result["checkpoint"]).name == "step_00000040"
    assert (tmp_path / "checkpoints" / "step_00000020" / "manifest.json").is_file()  # each epoch's end
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["gradient_acc"] == 2


def test_perf_mode_and_profile(faceset, tmp_path, capsys):
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path), "--perf-steps", "3", "--profile")
    assert status == 0, err
    result = summary(out)
    assert result["steps"] == 5 and result["samples_per_second"] > 0  # 2 warm-up steps, then 3 timed
    assert set(result["phases"]) == {"data", "backbone", "head", "communication", "optimizer"}
    assert sum(result["phases"].values()) == pytest.approx(1.0) and result["phases"]["backbone"] > 0
    assert "perf: 3 steps" in out
    assert list((tmp_path / "profile").glob("trace_rank0.json"))
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(faceset, tmp_path, capsys):
    status, out, err = call(
        capsys, "train", *settings(faceset, tmp_path, lr=1e30, max_nonfinite_steps=2, clip_grad_norm=0, warmup_epoch=0)
    )
    assert_one_error(status, err, "2 steps in a row", "max_nonfinite_steps=2")
    assert "skipped" in out


def corrupted_copy(
    faceset: Path, tmp_path: Path, garbage: Sequence[int] = (), writes: Mapping[int, tuple[int, bytes]] = {}
) -> Path:
    """A copy of the face set whose records ``garbage`` hold bytes that are no image (their framing kept) and whose
    records ``writes`` names get ``bytes`` written at an offset within them (0: the magic number, 12: the label)."""
    data = tmp_path / "data"
    shutil.copytree(faceset, data)
    offsets = dict(line.split("\t") for line in (data / "train.idx").read_text().splitlines())
    changes = {**{key: (8 + 24, b"\x00 this is no JPEG " * 4) for key in garbage}, **writes}
    with open(data / "train.rec", "r+b") as rec:
        for key, (at, data_bytes) in changes.items():
            rec.seek(int(offsets[str(key)]) + at)
            rec.write(data_bytes)
    return data


BAD_KEYS = (5, 77, 200)  # images are keys 1..320


def test_two_ranks_skip_bad_records_log_each_once_and_finish(faceset, tmp_path):
    data = corrupted_copy(faceset, tmp_path, garbage=BAD_KEYS)
    job = launch("mpirun", 2, train_argv(data, tmp_path / "out", num_workers=1, val_targets="[]"), timeout=240)
    assert job.returncode == 0, job.stderr
    logged = [line for line in job.stdout.splitlines() if "skipped bad record" in line]
    assert sorted(int(re.search(r"train\.rec, key (\d+),", line).group(1)) for line in logged) == sorted(BAD_KEYS)
    assert all(
        re.search(rf"{data / 'train.rec'}, key \d+, offset \d+: cannot decode image .*\(rank [01]\)", line)
        for line in logged
    ), logged
    result = summary(job.stdout)
    assert result["steps"] == 10 and result["bad_records"] == len(BAD_KEYS)  # every batch refilled to full size


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_past_max_bad_records_every_rank_stops_with_one_clear_error(faceset, tmp_path, launcher):
    data = corrupted_copy(faceset, tmp_path, garbage=range(1, 321, 9))  # 36 of 320
    job = launch(launcher, 2, train_argv(data, tmp_path / "out", max_bad_records=4, val_targets="[]"), timeout=120)
    errors = [
        line.split("partial-fc: error: ", 1)[1] for line in job.stderr.splitlines() if "partial-fc: error:" in line
    ]
    assert job.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], job.stderr
    assert re.match(
        r"stopped at step \d+: [5-9]\d* bad records skipped, more than max_bad_records=4 \(the last: .*"
        r"train\.rec, key \d+, offset \d+: cannot decode image",
        errors[0],
    ), errors[0]
    assert "partial-fc check-data --rec" in errors[0] and "partial_fc/" not in job.stderr  # horovodrun's own traceback
    assert len(job.stdout.split("skipped bad record")) - 1 == int(errors[0].split(": ")[1].split()[0])


@pytest.mark.parametrize("case", ["label_out_of_range", "label_not_an_integer", "zeroed_magic"])
def test_bad_headers_fail_before_the_first_step_naming_file_key_and_value(faceset, tmp_path, capsys, case):
    key, at, written, expected = {
        "label_out_of_range": (33, 12, struct.pack("<f", 99.0), "label 99 is outside"),
        "label_not_an_integer": (34, 12, struct.pack("<f", 2.5), "label 2.5 is not a class id"),
        "zeroed_magic": (35, 0, bytes(4), "bad magic number 0x00000000"),
    }[case]
    data = corrupted_copy(faceset, tmp_path, writes={key: (at, written)})
    status, out, err = call(capsys, "train", *settings(data, tmp_path / "out"))
    assert_one_error(status, err, f"{data / 'train.rec'}: record at key {key}, offset ", expected)
    assert "training r10_nano" not in out and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_rec_truncated_past_max_bad_records_fails_before_training(faceset, tmp_path, capsys):
    """A header-less copy of the set (the insightface header, written last, would be cut off first), cut in half."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(faceset / "property", data / "property")
    source = IndexedRecordReader(faceset / "train.rec", faceset / "train.idx")
    with IndexedRecordWriter(data / "train.rec", data / "train.idx") as writer:
        for key in range(IDENTITIES * PER_ID):
            offset = writer.write(key, source.read(key + 1))
            if key == IDENTITIES * PER_ID // 2:
                half = offset + 100
    os.truncate(data / "train.rec", half)
    status, out, err = call(capsys, "train", *settings(data, tmp_path / "out"))
    assert_one_error(
        status,
        err,
        f"160 records of {data} are cut off by a truncated .rec, more than max_bad_records=10",
        f"(the first: {data / 'train.rec'}, key 160, offset ",
    )
    assert "training r10_nano" not in out


def test_zeroed_magic_fails_every_rank_before_training(faceset, tmp_path):
    data = corrupted_copy(faceset, tmp_path, writes={35: (0, bytes(4))})
    job = launch("mpirun", 2, train_argv(data, tmp_path / "out"), timeout=120)
    errors = job.stderr.split("partial-fc: error:")[1:]
    assert job.returncode != 0 and 1 <= len(errors) <= 2 and "training r10_nano" not in job.stdout, job.stderr
    assert all("key 35" in error and "bad magic number 0x00000000" in error for error in errors), errors


EXACT_CLIP = 0.5  # below every step's gradient norm in the clipped variant, so clipping acts on each step
EXACT_VARIANTS = {
    "sgd": dict(optimizer="sgd", lr=0.02, clip_grad_norm=0),
    "adamw_acc2_clip": dict(optimizer="adamw", lr=0.003, weight_decay=0.05, gradient_acc=2, clip_grad_norm=EXACT_CLIP),
}
EXACT_SETTINGS = dict(
    network="plain_nano", sample_rate=1.0, num_epoch=1, warmup_epoch=0.5, checkpoint_every=5, keep_checkpoints=4
)
# float32, the batch summed in another order: parameters agree to ~5e-5 after 20 steps here; optimizer state
# (sums of gradients with cancellation, e.g. PReLU slopes) to ~3e-4 on one CPU and 1.75e-3 on another (AdamW's
# exp_avg at the last step, where the clipped gradients nearly cancel; GEMM kernels round differently per CPU).
# A wrong gradient scale is off by ~0.5.
EXACT_TOLERANCE = {"parameters": 1e-4, "optimizer state": 5e-3}


def tolerance_of(name: str) -> float:
    return EXACT_TOLERANCE["parameters" if name == "centers" or name.startswith("backbone.") else "optimizer state"]


@pytest.fixture(scope="module")
def one_process_runs(faceset, tmp_path_factory):
    """`partial-fc train` on one rank with batch 16, per variant (made once, shared by the launchers' tests)."""
    runs = {}

    def run(variant: str) -> Path:
        if variant not in runs:
            output = tmp_path_factory.mktemp(f"one_{variant}")
            argv = train_argv(faceset, output, batch_size=16, **EXACT_SETTINGS, **EXACT_VARIANTS[variant])
            job = launch("mpirun", 1, argv, timeout=400)
            assert job.returncode == 0, job.stderr
            runs[variant] = output
        return runs[variant]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(EXACT_VARIANTS))
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_two_ranks_train_exactly_like_one_process_on_the_doubled_batch(
    faceset, tmp_path, one_process_runs, launcher, variant
):
    """Batch 8 on each of 2 ranks against batch 16 on one (BatchNorm-free network, every center sampled): the
    same samples and flips per step, so every tensor of every checkpoint must agree, and every logged step."""
    job = launch(
        launcher,
        2,
        train_argv(faceset, tmp_path, batch_size=8, **EXACT_SETTINGS, **EXACT_VARIANTS[variant]),
        timeout=400,
    )
    assert job.returncode == 0, job.stderr
    one = one_process_runs(variant)
    saved = sorted(path.name for path in (one / "checkpoints").glob("step_*"))
    assert saved == sorted(path.name for path in (tmp_path / "checkpoints").glob("step_*")) and len(saved) >= 2
    for name in saved:
        got, want = checkpoint_tensors(tmp_path / "checkpoints" / name), checkpoint_tensors(one / "checkpoints" / name)
        assert sorted(got) == sorted(want)
        errors = {key: relative_error(got[key], value) for key, value in want.items()}
        assert all(error < tolerance_of(key) for key, error in errors.items()), (name, errors)
    first, last = (checkpoint_tensors(one / "checkpoints" / name) for name in (saved[0], saved[-1]))
    moved = [relative_error(last[key], first[key]) for key in first if key.startswith("backbone.")] + [
        relative_error(last["centers"], first["centers"])
    ]
    assert min(moved) > 100 * EXACT_TOLERANCE["parameters"]  # they move far beyond the tolerance: it discriminates
    rows_two, rows_one = metrics(tmp_path), metrics(one)
    assert [row["step"] for row in rows_two] == [row["step"] for row in rows_one] == list(range(1, len(rows_one) + 1))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [row[key] for row in rows_two] == pytest.approx(
            [row[key] for row in rows_one], rel=EXACT_TOLERANCE["parameters"]
        ), key
    if EXACT_VARIANTS[variant]["clip_grad_norm"]:
        assert min(row["grad_norm"] for row in rows_one) > EXACT_CLIP


def test_a_loss_scaler_changes_no_step(faceset, tmp_path):
    """The fp16 path's GradScaler (GPUs) scales only the backbone's backward, by powers of two, and unscales before
    clipping: every checkpoint equals an unscaled run's bit for bit (torch's CPU GradScaler stands in here)."""
    saved = {}
    for name in ("unscaled", "scaled"):
        overrides = settings(faceset, tmp_path / name, **EXACT_SETTINGS, **EXACT_VARIANTS["adamw_acc2_clip"])[1::2]
        trainer = Trainer(
            load_config("synthetic", [*overrides, "val_targets=[]"], environ={}), SingleProcessCommunicator()
        )
        if name == "scaled":  # grows 2**12 -> 2**17 over the run: a real, changing scale
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        result = trainer.fit()
        saved[name] = tmp_path / name / "checkpoints"
    assert trainer.scaler.get_scale() == 2.0**17 and result.skipped_steps == 0
    names = sorted(path.name for path in saved["unscaled"].glob("step_*"))
    assert names == sorted(path.name for path in saved["scaled"].glob("step_*")) and names
    for name in names:
        plain, scaled = checkpoint_tensors(saved["unscaled"] / name), checkpoint_tensors(saved["scaled"] / name)
        assert all(torch.equal(scaled[key], value) for key, value in plain.items()), name


def test_resume_auto_starts_afresh_without_a_checkpoint_and_continues_from_one(faceset, tmp_path, capsys):
    """What a restart loop passes: resume when there is a checkpoint, start at step 0 when there is none."""
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path), "--set", "resume=auto")
    assert status == 0, err
    assert "resume=auto: no checkpoint" in out and summary(out)["steps"] == 20  # one process x batch 16
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path, num_epoch=2), "--set", "resume=auto")
    assert status == 0, err
    assert "resumed from" in out and "at step 20" in out and summary(out)["steps"] == 40


def test_resume_names_the_changed_keys_and_refuses_a_plan_already_done(faceset, tmp_path, capsys):
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path))
    assert status == 0, err
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path, num_epoch=2, lr=0.02), "--resume")
    assert status == 0, err
    changes = "config changed since the checkpoint: lr: 0.05 -> 0.02; num_epoch: 1 -> 2; the learning rate of step 21"
    assert changes in out
    assert summary(out)["steps"] == 40  # 20 steps per epoch on one rank
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path, num_epoch=2, lr=0.02), "--resume")
    assert_one_error(status, err, "step_00000040", "is at step 40", "ends at step 40", "raise num_epoch")
    assert sorted(losses(tmp_path)) == list(range(1, 41))  # nothing trained, nothing logged


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_ranks_started_with_different_configs_all_fail_naming_the_keys(faceset, tmp_path, launcher):
    """Rank-dependent settings (here from each rank's own variables) are caught before training."""
    script = tmp_path / "rank_dependent.sh"
    script.write_text(
        'rank="${OMPI_COMM_WORLD_RANK:-${HOROVOD_RANK:-0}}"\n'
        "export PFC_LR=0.0$((1 + rank)) PFC_WEIGHT_DECAY=0.00$((1 + rank))\n"
        'exec "$@"\n'
    )
    job = launch(
        launcher,
        2,
        [
            "-c",
            "import os, sys; os.execvp('bash', ['bash', *sys.argv[1:]])",
            str(script),
            sys.executable,
            *train_argv(faceset, tmp_path / "out"),
        ],
        timeout=180,
    )
    errors = job.stderr.split("partial-fc: error:")[1:]
    assert job.returncode != 0 and len(errors) == 2, job.stderr
    assert all(
        "different configs" in error and "rank 1: lr: 0.01 -> 0.02, weight_decay: 0.001 -> 0.002" in error
        for error in errors
    ), errors
    assert "training r10_nano" not in job.stdout


@pytest.mark.parametrize("case", ["typo", "missing_data", "too_few_classes", "bad_value"])
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_bad_setup_fails_every_rank_before_training(faceset, tmp_path, launcher, case):
    extra = {
        "typo": ["--set", "num_epochs=2"],
        "missing_data": ["--set", f"rec={tmp_path / 'nowhere'}"],
        "too_few_classes": ["--set", "num_classes=7"],
        "bad_value": ["--set", "sample_rate=1.5"],
    }[case]
    expected = {
        "typo": "did you mean 'num_epoch'",
        "missing_data": "nowhere",
        "too_few_classes": "num_classes=7",
        "bad_value": "sample_rate",
    }[case]
    job = launch(launcher, 2, [*train_argv(faceset, tmp_path / "out"), *extra], timeout=180)
    # Every rank fails on its own, before any collective; the launcher may kill a rank that has not printed
    # yet once the first one exits, so at least one (usually both) of the ranks' lines is there.
    errors = job.stderr.split("partial-fc: error:")[1:]
    assert job.returncode != 0 and 1 <= len(errors) <= 2, job.stderr
    assert all(expected in error for error in errors), errors
    assert "training r10_nano" not in job.stdout
    assert "partial_fc/" not in job.stderr  # no traceback through our code (horovodrun prints its own)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_resume_continues_exactly_like_an_uninterrupted_run(faceset, tmp_path, launcher):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    job = launch(launcher, 2, train_argv(faceset, whole, checkpoint_every=4, keep_checkpoints=5), timeout=400)
    assert job.returncode == 0, job.stderr
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    job = launch(launcher, 2, train_argv(faceset, resumed, "--resume", checkpoint_every=4), timeout=400)
    assert job.returncode == 0, job.stderr
    assert "resumed from" in job.stdout and summary(job.stdout)["steps"] == 10
    before, after = losses(whole), losses(resumed)
    assert sorted(after) == list(range(5, 11))
    assert [after[step] for step in range(5, 11)] == [before[step] for step in range(5, 11)]


@pytest.mark.slow
def test_resume_on_three_then_one_rank_reshards_and_continues(faceset, tmp_path):
    output = tmp_path / "run"
    first = launch("mpirun", 2, train_argv(faceset, output), timeout=400)
    assert first.returncode == 0, first.stderr
    start_loss = losses(output)[1]
    second = launch("horovodrun-gloo", 3, train_argv(faceset, output, "--resume", num_epoch=2), timeout=400)
    assert second.returncode == 0, second.stderr
    assert "saved on 2 ranks, re-sharded" in second.stdout
    third = launch("mpirun", 1, train_argv(faceset, output, "--resume", num_epoch=3), timeout=400)
    assert third.returncode == 0, third.stderr
    assert "saved on 3 ranks, re-sharded" in third.stdout
    curve = losses(output)
    assert max(curve) == summary(third.stdout)["steps"]
    assert curve[11] < start_loss  # the resumed centers and backbone were trained, not re-initialised
    manifest = json.loads((Path(summary(third.stdout)["checkpoint"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["num_classes"] == IDENTITIES


@pytest.mark.slow
def test_small_main_job_reaches_verification_accuracy(tmp_path):
    data = tmp_path / "data"
    assert (
        call_quiet(
            "make-synthetic", "--identities", "100", "--images-per-id", "16", "--out", str(data), "--workers", "1"
        )
        == 0
    )
    argv = [
        "-m",
        "partial_fc",
        "train",
        "synthetic",
        "--set",
        f"rec={data}",
        "--set",
        f"output={tmp_path / 'out'}",
        "--set",
        "num_classes=100",
        "--set",
        "num_image=1600",
        "--set",
        "num_epoch=3",
        "--set",
        "batch_size=32",
        "--set",
        "verbose=25",
        "--set",
        "num_workers=1",
    ]
    job = launch("mpirun", 2, argv, timeout=900)
    assert job.returncode == 0, job.stderr
    assert summary(job.stdout)["best_verification"]["synthetic"] >= 0.9


def test_init_weights_start_the_backbone_from_an_arcface_torch_file(faceset, tmp_path):
    published = get_model("r10_nano", num_features=32)
    torch.nn.init.normal_(published.fc.weight)  # anything but the fresh initialisation
    torch.save({f"module.{k}": v for k, v in published.state_dict().items()}, tmp_path / "backbone.pth")
    overrides = settings(faceset, tmp_path / "out")[1::2]  # the key=value halves of the --set pairs
    cfg = load_config("synthetic", [*overrides, f"init_weights={tmp_path / 'backbone.pth'}"], environ={})
    trainer = Trainer(cfg, SingleProcessCommunicator())
    loaded = trainer.raw_backbone.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in published.state_dict().items())
    torch.save(get_model("r18", num_features=32).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(InputError, match="r18.pth: weights do not match network .r10_nano."):
        Trainer(
            load_config("synthetic", [*overrides, f"init_weights={tmp_path / 'r18.pth'}"], environ={}),
            SingleProcessCommunicator(),
        )


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "horovodrun-mpi"])
def test_other_launchers_train(faceset, tmp_path, launcher):
    job = launch(launcher, 2, train_argv(faceset, tmp_path, "--perf-steps", "2"), timeout=400)
    assert job.returncode == 0, job.stderr
    result = summary(job.stdout)
    assert result["ranks"] == 2 and result["steps"] == 4 and result["samples_per_second"] > 0


@pytest.mark.parametrize(
    "variant",
    [
        {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.05},
        {"fp16": "true", "amp_dtype": "bfloat16", "storage_dtype": "bfloat16"},
        {"interclass_filtering_threshold": 0.3, "sample_rate": 1.0},
    ],
)
def test_training_variants_run_and_learn(faceset, tmp_path, capsys, variant):
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path, num_epoch=2, **variant))
    assert status == 0, err
    curve = losses(tmp_path)
    assert summary(out)["steps"] == 40 and all(value == value for value in curve.values())  # finite, no skips
    assert min(curve[step] for step in range(31, 41)) < curve[1]


@pytest.mark.slow
def test_horovodrun_starts_config_sh_on_every_rank(faceset, tmp_path):
    require("horovodrun-gloo")
    cmd = [
        "horovodrun",
        "--gloo",
        "-np",
        "2",
        "-H",
        "localhost:2",
        "bash",
        str(REPO / "config.sh"),
        *settings(faceset, tmp_path),
        "--perf-steps",
        "1",
    ]
    env = {**os.environ, "CONFIG": "synthetic", "LR": "0.05", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert job.returncode == 0, job.stderr
    result = summary(job.stdout)
    assert result["ranks"] == 2 and result["steps"] == 3
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.05  # config.sh's LR setting


# ------------------------------------------------------------ checkpoint faults: full and read-only disks, two runs

DISK_KIB = 2400  # these runs' logs and one checkpoint (1.5 MB) fit on it, a second checkpoint does not


def report_lines(stderr: str, kind: str = "error") -> list[str]:
    """The text of every `partial-fc: <kind>:` line, launcher tags left out."""
    marker = f"partial-fc: {kind}: "
    return [line.split(marker, 1)[1] for line in stderr.splitlines() if marker in line]


@pytest.mark.parametrize("on_save_error", ["stop", "continue"])
def test_a_full_disk_fails_the_save_on_every_rank_and_keeps_the_previous_checkpoint(faceset, tmp_path, on_save_error):
    """A real 2.4 MB tmpfs (its own mount namespace) as the output: the step-4 checkpoint fits, step 8's does not."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    argv = train_argv(faceset, disk / "out", checkpoint_every=4, on_save_error=on_save_error)
    job = launch("mpirun", 2, argv, prefix=mounts.full_disk(disk, DISK_KIB, kept), timeout=180)
    errors, warnings = report_lines(job.stderr), report_lines(job.stderr, "warning")
    assert job.returncode not in (0, 97) and len(errors) == 2 and errors[0] == errors[1], job.stderr
    assert "Traceback" not in job.stderr and "enforce fail" not in job.stderr, job.stderr
    failed = 8 if on_save_error == "stop" else 10  # with continue, step 8 fails, training goes on, the final fails
    assert errors[0].startswith(
        f"checkpoint {disk}/out/checkpoints/step_{failed:08d} was not saved: cannot write "
        f"{disk}/out/checkpoints/.step_{failed:08d}.partial/"
    ), errors[0]
    assert "No space left on device (ENOSPC)" in errors[0] and "--resume" in errors[0]
    assert f"the newest checkpoint, {disk}/out/checkpoints/step_00000004, is intact" in errors[0]
    if on_save_error == "stop":
        assert "stopped after step 8 (on_save_error=stop)" in errors[0] and not warnings, job.stderr
        assert "step 9/10" not in job.stdout
    else:
        assert len(warnings) == 2 and all(
            "step_00000008 was not saved" in line and "training goes on" in line for line in warnings
        ), warnings
        assert "step 10/10" in job.stdout and "stopped after step 10 (the run's last checkpoint)" in errors[0]
    checkpoints = kept / "out" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_00000004"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert not (kept / "out" / "run.lock").exists()  # freed as the run stopped
    overrides = settings(faceset, kept / "out")[1::2]
    trainer = Trainer(load_config("synthetic", [*overrides, "resume=true"], environ={}), SingleProcessCommunicator())
    try:
        trainer.resume()
        assert trainer.step == 4
    finally:
        trainer.close()


def test_a_read_only_output_folder_fails_every_rank_with_one_clear_line(faceset, tmp_path):
    folder = tmp_path / "ro"
    (folder / "out").mkdir(parents=True)
    job = launch("mpirun", 2, train_argv(faceset, folder / "out"), prefix=mounts.read_only(folder), timeout=120)
    errors = report_lines(job.stderr)
    assert job.returncode not in (0, 97) and len(errors) == 2 and errors[0] == errors[1], job.stderr
    assert str(folder / "out") in errors[0] and "Read-only file system" in errors[0], errors[0]
    assert "Traceback" not in job.stderr and "training r10_nano" not in job.stdout


def test_an_unwritable_config_json_fails_with_one_line_and_frees_the_folder(faceset, tmp_path, capsys):
    (tmp_path / "config.json").mkdir()  # in the way of the file
    status, out, err = call(capsys, "train", *settings(faceset, tmp_path))
    assert_one_error(status, err, f"cannot write {tmp_path / 'config.json'}")
    assert not (tmp_path / "run.lock").exists() and "training r10_nano" not in out


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, as an out-of-memory killer or a lost node would."""
    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()


def test_one_run_per_output_folder_and_a_killed_runs_folder_is_taken_over(faceset, tmp_path):
    output = tmp_path / "run"
    checkpoints = output / "checkpoints"
    first = start("mpirun", 2, train_argv(faceset, output, num_epoch=30, checkpoint_every=4))
    try:
        wait_for_step(output, 5, first)
        owner = read_owner(output / "run.lock")[0]
        began = time.monotonic()
        second = launch("mpirun", 2, train_argv(faceset, output, lr=0.02), timeout=120)
        refused_after = time.monotonic() - began
        errors = report_lines(second.stderr)
        assert second.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], second.stderr
        assert errors[0].startswith(f"output folder {output} is in use by another run ({owner.describe()}; "), errors
        assert f"if it is dead, delete {output / 'run.lock'}" in errors[0]
        assert refused_after < 40 and first.poll() is None, refused_after  # the owner trains on
        assert json.loads((output / "config.json").read_text())["lr"] == 0.05  # still the owner's config
    finally:
        kill_job(first)
    deadline = time.monotonic() + 30
    while owner.is_alive(time.time()) and time.monotonic() < deadline:
        time.sleep(0.1)
    dead = checkpoints / ".step_00000099.partial"  # as if the killed run had been saving
    dead.mkdir()
    write_owner(dead / ".owner", owner)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        live = checkpoints / ".step_00000098.partial"  # a save of a process that still runs
        live.mkdir()
        write_owner(live / ".owner", Owner.of_process(sleeper.pid))
        third = launch(
            "mpirun",
            2,
            train_argv(faceset, output, "--resume", "--perf-steps", "1", num_epoch=30, checkpoint_every=4),
            timeout=180,
        )
        assert third.returncode == 0, third.stderr
        assert f"took over {output} from a run that is gone ({owner.describe()})" in third.stdout, third.stdout
        assert f"removed {dead}, left by an interrupted save" in third.stdout
        assert re.search(rf"resumed from {checkpoints}/step_\d{{8}} at step \d+", third.stdout), third.stdout
        assert live.is_dir() and not dead.exists() and not (output / "run.lock").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cpu_data_workers_hold_no_image_of_the_centers(tmp_path):
    """On a CPU the shard and its momentum live in the trainer's memory. A forked worker would keep a copy-on-write
    image of them, so each row the optimizer wrote would be duplicated (at 10M classes the OOM killer ended the
    run by the second step); the workers start from a fresh process and each holds far less than the shard."""
    overrides = [
        "rec=synthetic",
        "num_classes=400000",
        "embedding_size=512",
        "num_image=64",
        "batch_size=16",
        "num_workers=1",
        "num_epoch=1",
        "warmup_epoch=0",
        "sample_rate=0.1",
        "val_targets=[]",
        f"output={tmp_path}",
        "frequent=1",
    ]
    trainer = Trainer(load_config("synthetic", overrides, environ={}), SingleProcessCommunicator())
    assert trainer.fit().steps == 4
    shard_bytes = trainer.head.weight.numel() * trainer.head.weight.element_size()
    workers = trainer.loader._iterator._workers  # persistent: alive after the epoch
    assert len(workers) == 1
    assert psutil.Process(workers[0].pid).memory_info().rss < shard_bytes / 2
