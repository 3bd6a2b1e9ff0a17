"""Checkpoints: exact round trip, resharding across world sizes on real launchers, crash safety, bad files."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from partial_fc.backbones.weights import load_backbone_state
from partial_fc.comm import SingleProcessCommunicator
from partial_fc.engine import checkpoint as ckpt
from partial_fc.engine.checkpoint import (
    TrainingParts,
    TrainingState,
    backbone_weights_file,
    clean_leftovers,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from partial_fc.engine.checkpoint import save as saving
from partial_fc.engine.run_lock import STALE_AFTER_S, OutputFolderError, Owner, RunLock, read_owner, write_owner
from partial_fc.errors import InputError, MissingInputError
from tests import mounts
from tests.launchers import launch, worker
from tests.workers.checkpoint_job import CLASSES, build, train_step

COMM = SingleProcessCommunicator()


def trained(steps: int = 2, seed: int = 0):
    setup = build(COMM, seed=seed)
    for _ in range(steps):
        train_step(setup)
    return setup


def save(root, setup, step: int, **options) -> Path:
    return save_checkpoint(root, setup.parts(), comm=setup.comm, step=step, epoch=setup.sampler.epoch, **options)


def snapshot(setup) -> dict:
    """Every tensor and number that later steps depend on, for exact comparison."""
    momentum = setup.head_optimizer.state[setup.head.weight]["momentum_buffer"]
    backbone_momentum = [setup.backbone_optimizer.state[p]["momentum_buffer"] for p in setup.backbone.parameters()]
    return {
        "backbone": {k: v.clone() for k, v in setup.backbone.state_dict().items()},
        "backbone_momentum": [m.clone() for m in backbone_momentum],
        "centers": setup.head.weight.clone(),
        "momentum": momentum.clone(),
        "lr": [g["lr"] for g in setup.backbone_optimizer.param_groups],
        "sampler": setup.sampler.state_dict(),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), torch.Tensor):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        else:
            assert a[key] == b[key], key


def test_round_trip_continues_bit_identically(tmp_path):
    original = trained(2)
    assert original.head_optimizer.state[original.head.weight]["momentum_buffer"].abs().sum() > 0
    path = save(tmp_path, original, step=2, config={"seed": 0, "lr": 0.1}, extra={"best": 0.5, "t": torch.ones(2)})
    assert path == tmp_path / "step_00000002" and (tmp_path / "latest").read_text().strip() == path.name
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["centers"] == [
        {"file": f"centers_0-{CLASSES}.pt", "start": 0, "end": CLASSES, "rank": 0, "dtype": "float32"}
    ]
    assert manifest["row_state"] == ["momentum_buffer"] and manifest["config"] == {"seed": 0, "lr": 0.1}
    assert {p.name for p in path.iterdir()} == {"manifest.json", *manifest["files"]}
    for name, meta in manifest["files"].items():
        assert (path / name).stat().st_size == meta["size"]

    continued = [train_step(original) for _ in range(3)]
    expected = snapshot(original)

    fresh = build(COMM, seed=5)  # different initial weights, centers and sampling stream
    torch.manual_seed(123)
    state = load_checkpoint(tmp_path, fresh.parts(), comm=COMM)
    assert isinstance(state, TrainingState)
    assert (state.step, state.epoch, state.resharded, state.rng_restored) == (2, 0, False, True)
    assert state.config == {"seed": 0, "lr": 0.1} and state.extra["best"] == 0.5
    assert torch.equal(state.extra["t"], torch.ones(2)) and state.path == path
    assert [train_step(fresh) for _ in range(3)] == continued
    assert_same(snapshot(fresh), expected)


def test_backbone_is_saved_without_ddp_prefix_and_loads_from_every_source(tmp_path):
    setup = trained(1)
    wrapped = nn.DataParallel(setup.backbone)  # CPU: a pass-through wrapper whose state dict says "module."
    setup.backbone = wrapped
    path = save(tmp_path / "run", setup, step=1)
    weights = setup.backbone.module.state_dict()
    for source in (path, tmp_path / "run"):
        state = load_backbone_state(backbone_weights_file(source))
        assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    published = tmp_path / "backbone.pth"
    torch.save(wrapped.state_dict(), published)  # arcface_torch-style plain file, with DDP prefixes
    assert sorted(load_backbone_state(published)) == ["bias", "weight"]
    nested = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": weights, "epoch": 3}, nested)
    assert sorted(load_backbone_state(nested)) == ["bias", "weight"]


@pytest.mark.parametrize("content", ["a list", "text", "empty"])
def test_load_backbone_state_rejects_what_is_not_a_state_dict(tmp_path, content):
    bad = tmp_path / f"{content.replace(' ', '_')}.pth"
    if content == "a list":
        torch.save([torch.ones(2)], bad)
    elif content == "text":
        bad.write_text("not a torch file")
    else:
        torch.save({}, bad)
    with pytest.raises(InputError, match=str(bad)):
        load_backbone_state(bad)
    with pytest.raises(MissingInputError, match="nowhere.pth"):
        load_backbone_state(tmp_path / "nowhere.pth")


def test_keep_deletes_only_older_complete_checkpoints(tmp_path):
    setup = trained(1)
    (tmp_path / "notes.txt").write_text("mine")
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, setup, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "notes.txt", "step_00000004", "step_00000005"]
    assert find_latest(tmp_path) == tmp_path / "step_00000005"
    save(tmp_path, setup, step=5, keep=2)  # saving a step again replaces it
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000005"]


def test_interrupted_save_and_leftover_partial_are_ignored_and_cleaned(tmp_path, monkeypatch):
    setup = trained(2)
    good = save(tmp_path, setup, step=2)
    expected = snapshot(setup)
    leftover = tmp_path / ".step_00000099.partial"
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    train_step(setup)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(saving, "write_text_durably", crash)  # dies before the manifest exists
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, setup, step=3)
    monkeypatch.undo()
    assert (tmp_path / ".step_00000003.partial").is_dir() and not (tmp_path / "step_00000003").exists()
    assert find_latest(tmp_path) == good

    fresh = build(COMM, seed=9)
    assert load_checkpoint(tmp_path, fresh.parts(), comm=COMM).step == 2
    assert_same(snapshot(fresh), expected)

    save(tmp_path, fresh, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_stale_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    setup = trained(1)
    save(tmp_path, setup, step=1)
    save(tmp_path, setup, step=2)
    shutil.rmtree(tmp_path / "step_00000002")
    assert find_latest(tmp_path) == tmp_path / "step_00000001"
    assert find_latest(tmp_path / "step_00000001") == tmp_path / "step_00000001"
    assert find_latest(tmp_path / "absent") is None


def corrupt(path: Path, case: str) -> str:
    """Damage the checkpoint at `path` in one way; returns the file name the error must name."""
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = path / manifest["centers"][0]["file"]
    if case == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:-100])
        return str(shard)
    if case == "flipped_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return str(shard)
    if case == "missing_shard":
        shard.unlink()
        return str(shard)
    if case == "missing_manifest":
        manifest_path.unlink()
        return str(manifest_path)
    if case == "corrupt_json":
        manifest_path.write_text(manifest_path.read_text()[:-10])
        return str(manifest_path)
    if case == "num_classes":
        manifest["num_classes"] += 1
    elif case == "embedding_size":
        manifest["embedding_size"] = 16
    elif case == "gap_in_ranges":
        manifest["centers"][0]["start"] = 1
    manifest_path.write_text(json.dumps(manifest))
    return str(manifest_path)


ERRORS = {
    "truncated_shard": "truncated",
    "flipped_byte": "sha256",
    "missing_shard": "missing",
    "missing_manifest": "missing",
    "corrupt_json": "not valid JSON",
    "num_classes": "num_classes=51, the running head has num_classes=50",
    "embedding_size": "embedding_size=16, the running head has embedding_size=8",
    "gap_in_ranges": r"leaves \[0, 1\) uncovered",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_checkpoint_files_raise_input_error_naming_the_file(tmp_path, case):
    path = save(tmp_path, trained(1), step=1)
    named = corrupt(path, case)
    with pytest.raises(InputError, match=ERRORS[case]) as caught:
        load_checkpoint(path, build(COMM).parts(), comm=COMM)
    assert named in str(caught.value)


def test_non_json_config_and_unsafe_extra_are_refused_at_save(tmp_path):
    setup = trained(1)
    with pytest.raises(InputError, match="JSON"):
        save(tmp_path, setup, step=1, config={"path": Path("x")})
    with pytest.raises(InputError, match="weights_only"):
        save(tmp_path, setup, step=1, extra={"path": Path("x")})
    assert find_latest(tmp_path) is None


class FirstOfMany(SingleProcessCommunicator):
    """Rank 0 of a pretend world: enough to load one shard of another size in a single process."""

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor, sizes=None):
        return torch.cat([tensor] * self._world_size)


def adam_like_head(start: int, end: int, seed: int):
    """A shard [start, end) with an Adam optimizer whose state has per-row tensors of two ranks and a scalar."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(end - start, 8, generator=generator)
    head = SimpleNamespace(
        weight=weight,
        class_start=start,
        num_local=end - start,
        num_classes=CLASSES,
        embedding_size=8,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam([weight], lr=0.01 * (seed + 1))
    rows = end - start
    optimizer.state[weight].update(
        step=torch.tensor(float(seed)),
        exp_avg=torch.randn(rows, 8, generator=generator),
        exp_avg_sq=torch.rand(rows, 8, generator=generator).double(),
        row_norm=torch.rand(rows, generator=generator),
    )
    return head, optimizer


def test_every_per_row_optimizer_tensor_is_resharded_and_scalar_state_kept(tmp_path):
    setup = build(COMM)
    head, optimizer = adam_like_head(0, CLASSES, seed=3)
    path = save_checkpoint(
        tmp_path,
        TrainingParts(
            backbone=setup.backbone, backbone_optimizer=setup.backbone_optimizer, head=head, head_optimizer=optimizer
        ),
        comm=COMM,
        step=4,
        epoch=0,
    )
    assert json.loads((path / "manifest.json").read_text())["row_state"] == ["exp_avg", "exp_avg_sq", "row_norm"]
    saved = optimizer.state[head.weight]
    for start, end in ((0, 17), (17, 34), (34, 50), (10, 45)):
        shard, shard_optimizer = adam_like_head(start, end, seed=11)
        parts = TrainingParts(
            backbone=setup.backbone,
            backbone_optimizer=setup.backbone_optimizer,
            head=shard,
            head_optimizer=shard_optimizer,
        )
        state = load_checkpoint(path, parts, comm=FirstOfMany(3))
        assert state.resharded and not state.rng_restored and state.notes
        loaded = shard_optimizer.state[shard.weight]
        assert torch.equal(shard.weight, head.weight[start:end])
        for key in ("exp_avg", "exp_avg_sq", "row_norm"):
            assert loaded[key].dtype == saved[key].dtype and torch.equal(loaded[key], saved[key][start:end]), key
        assert torch.equal(loaded["step"], saved["step"])
        assert shard_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


class EpochOnlySampler:
    """A sampler whose state cannot be moved to another world size."""

    def __init__(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError("must not be loaded across world sizes")

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0


def test_sampler_without_world_size_restarts_the_epoch_on_another_world_size(tmp_path):
    setup = build(COMM)
    head, optimizer = adam_like_head(0, CLASSES, seed=3)
    sampler = EpochOnlySampler()
    sampler.epoch, sampler.position = 2, 7
    path = save_checkpoint(
        tmp_path,
        TrainingParts(
            backbone=setup.backbone,
            sampler=sampler,
            backbone_optimizer=setup.backbone_optimizer,
            head=head,
            head_optimizer=optimizer,
        ),
        comm=COMM,
        step=9,
        epoch=2,
    )
    shard, shard_optimizer = adam_like_head(0, 17, seed=1)
    resumed = EpochOnlySampler()
    state = load_checkpoint(
        path,
        TrainingParts(
            backbone=setup.backbone,
            sampler=resumed,
            backbone_optimizer=setup.backbone_optimizer,
            head=shard,
            head_optimizer=shard_optimizer,
        ),
        comm=FirstOfMany(3),
    )
    assert state.sampler_restarted and (resumed.epoch, resumed.position) == (2, 0)
    assert any("restarts from its beginning" in note for note in state.notes)


# ------------------------------------------------------------------------------------------------ multi-rank


def job(launcher: str, ranks: int, out: Path, *arguments: str) -> dict:
    out.mkdir()
    result = launch(launcher, ranks, [worker("checkpoint_job.py"), "--out", str(out), *arguments], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(out / "result.pt")


def assert_centers_equal(got: dict, want: dict) -> None:
    assert torch.equal(got["centers"], want["centers"]) and torch.equal(got["momentum"], want["momentum"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [pytest.param("mpirun", marks=pytest.mark.mpi), pytest.param("horovodrun-gloo", marks=pytest.mark.horovod)],
)
def test_resharding_2_to_3_to_1_ranks_and_exact_resume_on_2(tmp_path, launcher):
    first, second = tmp_path / "two", tmp_path / "three"
    uninterrupted = job(launcher, 2, tmp_path / "a", "--steps", "4", "--save-at", "2", "--save-root", str(first))
    saved = uninterrupted["saved"][2]
    assert saved["momentum"].abs().sum() > 0 and saved["centers"].shape == (CLASSES, 8)
    assert json.loads((first / "step_00000002" / "manifest.json").read_text())["world_size"] == 2

    on_three = job(launcher, 3, tmp_path / "b", "--resume", str(first), "--save-at", "2", "--save-root", str(second))
    assert on_three["state"]["resharded"] and not on_three["state"]["rng_restored"]
    assert not on_three["state"]["sampler_restarted"] and on_three["state"]["position"] == 2 * 8 // 3
    assert_centers_equal(on_three["loaded"], saved)
    manifest = json.loads((second / "step_00000002" / "manifest.json").read_text())
    names = sorted(entry["file"] for entry in manifest["centers"])
    assert names == ["centers_0-17.pt", "centers_17-34.pt", "centers_34-50.pt"]

    on_one = job(launcher, 1, tmp_path / "c", "--resume", str(second), "--steps", "3")
    assert on_one["state"]["resharded"] and on_one["losses"][3] > 0
    assert_centers_equal(on_one["loaded"], saved)

    resumed = job(launcher, 2, tmp_path / "d", "--resume", str(first), "--steps", "4")
    assert not resumed["state"]["resharded"] and resumed["state"]["rng_restored"]
    assert resumed["losses"] == {3: uninterrupted["losses"][3], 4: uninterrupted["losses"][4]}
    assert_centers_equal(resumed["final"], uninterrupted["final"])


@pytest.mark.slow
@pytest.mark.mpi
def test_truncated_shard_fails_every_rank_with_the_same_error(tmp_path):
    root = tmp_path / "ckpt"
    job("mpirun", 2, tmp_path / "a", "--steps", "1", "--save-at", "1", "--save-root", str(root))
    shard = root / "step_00000001" / "centers_25-50.pt"
    shard.write_bytes(shard.read_bytes()[:-64])
    out = tmp_path / "b"
    out.mkdir()
    result = launch("mpirun", 3, [worker("checkpoint_job.py"), "--out", str(out), "--resume", str(root)], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert [(out / f"rank{rank}.exit").read_text() for rank in range(3)] == ["2"] * 3, output
    assert output.count(f"partial-fc: error: no valid checkpoint in {root}: checkpoint file {shard} has") == 3, output


# ------------------------------------------------------------------------------------ faults: corruption, kills


@pytest.mark.parametrize("case", ["truncated_shard", "flipped_byte", "corrupt_json"])
def test_a_corrupt_newest_checkpoint_is_reported_and_the_newest_valid_one_is_loaded(tmp_path, case):
    setup = trained(1)
    save(tmp_path, setup, step=1)
    expected = snapshot(setup)
    train_step(setup)
    named = corrupt(save(tmp_path, setup, step=2), case)
    fresh = build(COMM, seed=4)
    state = load_checkpoint(tmp_path, fresh.parts(), comm=COMM)
    assert (state.step, state.path) == (1, tmp_path / "step_00000001")
    assert len(state.skipped) == 1 and named in state.skipped[0], state.skipped
    assert_same(snapshot(fresh), expected)
    with pytest.raises(ckpt.CorruptCheckpointError, match=re.escape(named)):  # named explicitly: no fallback
        load_checkpoint(tmp_path / "step_00000002", build(COMM).parts(), comm=COMM)
    corrupt(tmp_path / "step_00000001", "flipped_byte")
    with pytest.raises(ckpt.CorruptCheckpointError, match=f"no valid checkpoint in {re.escape(str(tmp_path))}"):
        load_checkpoint(tmp_path, build(COMM).parts(), comm=COMM)


def test_the_newest_checkpoint_is_the_last_saved_not_the_highest_step(tmp_path):
    """Resuming deliberately from an older checkpoint into the same root starts a line that wins from then on."""
    setup = trained(1)
    for step in (2, 4):
        save(tmp_path, setup, step=step)
    load_checkpoint(tmp_path / "step_00000002", setup.parts(), comm=COMM)
    save(tmp_path, setup, step=3)
    assert find_latest(tmp_path) == tmp_path / "step_00000003"  # not the abandoned step 4
    assert load_checkpoint(tmp_path, build(COMM).parts(), comm=COMM).step == 3
    save(tmp_path, setup, step=4, keep=2)  # the new line's step 4 replaces the old one; pruning goes by save order
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert json.loads((tmp_path / "step_00000004" / "manifest.json").read_text())["sequence"] == 4


KILLED = {"writing": 1, "manifest_written": 1, "renamed": 2, "latest_written": 2, "replacing": 2}


def test_a_kill_at_any_moment_of_a_save_leaves_the_newest_complete_checkpoint_to_resume(tmp_path):
    """A real SIGKILL of the saving process at each moment of a save (see tests/workers/checkpoint_faults.py)."""
    done = subprocess.run(
        [sys.executable, worker("checkpoint_faults.py"), "kill", str(tmp_path), *KILLED],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "killed.json").read_text()) == dict.fromkeys(KILLED, 9)  # each died by SIGKILL
    for point, newest in KILLED.items():
        root = tmp_path / point
        assert all((path / "manifest.json").is_file() for path in root.glob("step_*")), point  # none half-written
        if point == "renamed":
            assert (root / "latest").read_text().strip() == "step_00000001"  # the hint lags; resume does not
        tidied = clean_leftovers(root)  # what the next run (or save) does first
        assert not list(root.glob(".*")), (point, tidied)
        assert find_latest(root) == root / f"step_{newest:08d}", (point, tidied)
        assert load_checkpoint(root, build(COMM).parts(), comm=COMM).step == newest, point


def test_failed_saves_on_a_full_then_read_only_disk_remove_their_partial_and_keep_the_previous(tmp_path):
    """A real tmpfs in a private mount namespace: filled up (ENOSPC), then remounted read-only (EROFS)."""
    root, report = tmp_path / "disk", tmp_path / "report.json"
    done = subprocess.run(
        [
            *mounts.full_disk(root, 512, tmp_path / "kept"),
            sys.executable,
            worker("checkpoint_faults.py"),
            "disk",
            str(root),
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(report.read_text())
    assert outcome["step_1"] == "saved"
    for step, cause in (
        (2, r"\.partial/[\w.-]+\.pt: No space left on device \(ENOSPC\)"),
        (3, r"\.partial: Read-only file system \(EROFS\)"),
    ):
        assert re.search(
            rf"checkpoint {root}/step_0000000{step} was not saved: cannot write {root}/"
            rf"\.step_0000000{step}{cause}",
            outcome[f"step_{step}"],
        ), outcome
        assert f"the newest checkpoint, {root}/step_00000001, is intact" in outcome[f"step_{step}"]
    assert "the unfinished .step_00000002.partial was removed" in outcome["step_2"]
    assert outcome["after_step_2"] == ["ballast", "latest", "step_00000001"]
    assert outcome["after_step_3"] == ["latest", "step_00000001"] and outcome["latest"] == "step_00000001"
    kept = tmp_path / "kept"
    assert load_checkpoint(kept, build(COMM).parts(), comm=COMM).step == 1  # intact and loadable


# ---------------------------------------------------------------------------------- run lock and leftovers


def a_live_process() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def a_dead_owner() -> Owner:
    process = a_live_process()
    owner = Owner.of_process(process.pid)
    process.kill()
    process.wait()
    return owner


def place_lock(folder: Path, owner: Owner, age: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.lock"
    write_owner(path, owner)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_held_run_lock_refuses_naming_the_folder_and_its_owner(tmp_path):
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(OutputFolderError) as refused:
        RunLock.acquire(tmp_path)
    assert (
        f"output folder {tmp_path} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, started 20"
        in str(refused.value)
        and f"delete {tmp_path / 'run.lock'}" in str(refused.value)
    )
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    process = a_live_process()  # another live process on this host
    try:
        place_lock(tmp_path, Owner.of_process(process.pid), age=10 * STALE_AFTER_S)  # judged by its pid here
        with pytest.raises(OutputFolderError, match=f"pid {process.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        process.kill()
        process.wait()
    taken = RunLock.acquire(tmp_path)  # now its owner is dead: taken over at once
    assert taken.took_over is not None and taken.took_over.pid == process.pid
    assert read_owner(tmp_path / "run.lock")[0] == taken.owner
    taken.release()


def test_a_run_lock_is_stale_when_its_owner_is_dead_rebooted_or_silent_elsewhere(tmp_path):
    me = Owner.this_process()
    cases = {
        "dead": (a_dead_owner(), 0.0, True),
        "rebooted": (dataclasses.replace(me, boot_id="another-boot"), 0.0, True),
        "other host, fresh heartbeat": (dataclasses.replace(me, host="elsewhere"), 0.0, False),
        "other host, silent": (dataclasses.replace(me, host="elsewhere"), STALE_AFTER_S + 60, True),
    }
    for name, (owner, age, stale) in cases.items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        place_lock(folder, owner, age)
        if not stale:
            with pytest.raises(OutputFolderError, match=f"host elsewhere, pid {os.getpid()}"):
                RunLock.acquire(folder)
            continue
        lock = RunLock.acquire(folder)
        assert lock.took_over == owner, name
        lock.release()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "run.lock").write_text("")
    with pytest.raises(OutputFolderError, match="does not say by whom"):
        RunLock.acquire(tmp_path / "unreadable")


def test_a_restart_of_the_same_job_takes_over_its_earlier_attempts_lock_on_any_host(tmp_path, monkeypatch):
    """run.sh and torchrun end every rank before a restart, so the earlier attempt's lock is over, even when its
    rank 0 ran on a host that is gone; another job's lock, or a later attempt's, still refuses."""
    monkeypatch.setenv("PARTIAL_FC_JOB_ID", "job-7")
    monkeypatch.setenv("PARTIAL_FC_ATTEMPT", "1")
    first = dataclasses.replace(Owner.this_process(), host="lost-host", job="job-7", attempt=0)
    place_lock(tmp_path / "restart", first, age=0.0)
    lock = RunLock.acquire(tmp_path / "restart")
    assert lock.took_over == first
    lock.release()
    for name, owner in {
        "other job": dataclasses.replace(first, job="job-8"),
        "later attempt": dataclasses.replace(first, attempt=2),
    }.items():
        place_lock(tmp_path / name.replace(" ", "_"), owner, age=0.0)
        with pytest.raises(OutputFolderError, match="host lost-host"):
            RunLock.acquire(tmp_path / name.replace(" ", "_"))
    monkeypatch.delenv("PARTIAL_FC_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id names no job
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    place_lock(tmp_path / "torchrun", dataclasses.replace(first, job="none"), age=0.0)
    with pytest.raises(OutputFolderError, match="host lost-host"):
        RunLock.acquire(tmp_path / "torchrun")


def test_the_heartbeat_keeps_the_lock_fresh_until_it_is_lost(tmp_path, capsys):
    lock = RunLock.acquire(tmp_path)
    path = tmp_path / "run.lock"
    os.utime(path, (0, 0))
    lock.start_heartbeat(interval=0.05)
    deadline = time.monotonic() + 10
    while path.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert time.time() - path.stat().st_mtime < 60
    path.unlink()  # deleted by hand
    place_lock(tmp_path, dataclasses.replace(Owner.this_process(), host="elsewhere"))
    lock._thread.join(timeout=10)
    assert "is no longer this run's" in capsys.readouterr().err
    lock.release()
    assert read_owner(path)[0].host == "elsewhere"  # another run's lock is never deleted


def partial_owned_by(root: Path, step: int, owner: Owner | None) -> Path:
    partial = root / f".step_{step:08d}.partial"
    partial.mkdir(parents=True)
    (partial / "backbone.pt").write_bytes(b"half")
    if owner is not None:
        write_owner(partial / ".owner", owner)
    return partial


def test_only_dead_owners_leftovers_are_cleaned_and_a_live_owners_save_is_left_alone(tmp_path):
    setup = trained(1)
    save(tmp_path, setup, step=1)
    save(tmp_path, setup, step=2)
    process = a_live_process()
    try:
        live = partial_owned_by(tmp_path, 5, Owner.of_process(process.pid))
        dead = partial_owned_by(tmp_path, 6, a_dead_owner())
        ownerless = partial_owned_by(tmp_path, 7, None)
        (tmp_path / ".latest.abc.tmp").write_text("step_00000007")
        os.rename(tmp_path / "step_00000002", tmp_path / ".step_00000002.old")  # a replacement cut off
        shutil.copytree(tmp_path / "step_00000001", tmp_path / ".step_00000001.old")  # a replacement finished
        tidied = clean_leftovers(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "latest", "step_00000001", "step_00000002"]
        assert tidied == [
            f"removed {tmp_path / '.step_00000001.old'}, left by an interrupted save",
            f"put back {tmp_path / 'step_00000002'}, whose replacement was interrupted",
            f"removed {dead}, left by an interrupted save",
            f"removed {ownerless}, left by an interrupted save",
        ]
        with pytest.raises(
            ckpt.CheckpointSaveError,
            match=f"being written by another save .host {socket.gethostname()}, pid {process.pid}",
        ):
            save(tmp_path, setup, step=5)
        assert (live / "backbone.pt").read_bytes() == b"half"  # the live owner's save is untouched
    finally:
        process.kill()
        process.wait()
    save(tmp_path, setup, step=5)  # its owner is gone now
    assert find_latest(tmp_path) == tmp_path / "step_00000005" and not list(tmp_path.glob(".*"))
