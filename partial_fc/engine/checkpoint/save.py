"""Saving a checkpoint from every rank: each rank writes its files into `<root>/.step_<N>.partial/`, rank 0 checks
them, writes the manifest last and renames the folder into place, so a kill at any point leaves the older
checkpoints whole; a failed save removes its own `.partial` and raises `CheckpointSaveError` on every rank."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import partial_fc
from partial_fc.backbones.weights import strip_module_prefix
from partial_fc.comm import Communicator
from partial_fc.comm.agreement import on_every_rank, run_on_root
from partial_fc.engine.checkpoint.errors import CheckpointError, CheckpointSaveError
from partial_fc.engine.checkpoint.find import checkpoints_newest_first, find_latest, next_sequence
from partial_fc.engine.checkpoint.layout import (
    BACKBONE,
    BACKBONE_OPTIMIZER,
    FORMAT,
    LATEST,
    LEFTOVER,
    MANIFEST,
    OWNER,
    TRAINING,
    VERSION,
    centers_name,
    rank_name,
    step_dir_name,
)
from partial_fc.engine.checkpoint.parts import TrainingParts
from partial_fc.engine.checkpoint.rng import rng_state
from partial_fc.engine.run_lock import Owner, read_owner, write_owner
from partial_fc.errors import InputError, PartialFCError
from partial_fc.fileio import PathLike, atomic_path, fsync_path, os_error_cause, save_durably, write_text_durably
from partial_fc.progress import print_line

_HASH_BYTES = 32


def _save_error(path: Any, error: BaseException) -> CheckpointSaveError:
    return CheckpointSaveError(f"cannot write {path}: {os_error_cause(error)}")


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _write_rank_files(partial: Path, comm: Communicator, parts: TrainingParts) -> list[int]:
    """Write this rank's centers and rank file; returns [start, end, size, *sha, size, *sha] for the gather."""
    head, head_optimizer = parts.head, parts.head_optimizer
    rows, scalars = {}, {}
    for key, value in parts.center_state().items():
        if parts.is_row_state(value):
            rows[key] = _cpu(value)
        else:
            scalars[key] = _cpu(value) if isinstance(value, torch.Tensor) else value
    start, end = head.class_start, head.class_start + head.num_local
    groups = [{k: v for k, v in group.items() if k != "params"} for group in head_optimizer.param_groups]
    centers = {
        "start": start,
        "end": end,
        "weight": _cpu(head.weight),
        "row_state": rows,
        "scalar_state": scalars,
        "param_groups": groups,
    }
    sampler = parts.sampler.state_dict() if parts.sampler is not None else None
    ranked = {"rank": comm.rank, "world_size": comm.world_size, "sampler": sampler, "rng": rng_state(comm, head)}
    record = [start, end]
    for name, payload in ((centers_name(start, end), centers), (rank_name(comm.rank), ranked)):
        meta = save_durably(payload, partial / name)
        record += [meta["size"], *bytes.fromhex(meta["sha256"])]
    return record


def _write_root_files(
    partial: Path, step: int, epoch: int, parts: TrainingParts, extra: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Rank 0's files: backbone, its optimizer and the training state; returns their sizes and hashes."""
    scheduler, scaler = parts.scheduler, parts.scaler
    scaler_state = scaler.state_dict() if scaler is not None else None
    training = {
        "step": step,
        "epoch": epoch,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler_state or None,
        "extra": extra,
    }
    files = {
        BACKBONE: save_durably(strip_module_prefix(parts.plain_backbone.state_dict()), partial / BACKBONE),
        BACKBONE_OPTIMIZER: save_durably(parts.backbone_optimizer.state_dict(), partial / BACKBONE_OPTIMIZER),
        TRAINING: save_durably(training, partial / TRAINING),
    }
    try:
        torch.load(partial / TRAINING, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported as the caller's bad `extra` or scheduler state
        raise InputError(
            f"the training state (extra, scheduler or scaler) cannot be loaded with "
            f"weights_only=True; keep `extra` to tensors, numbers, strings, lists and dicts: {error}"
        )
    return files


def _in_progress(partial: Path) -> Owner | None:
    """The live process (not this one) still writing `partial`, or None when its save is dead (or ownerless)."""
    held = read_owner(partial / OWNER)
    if held is None or held[0].is_this_process() or not held[0].is_alive(held[1]):
        return None
    return held[0]


def clean_leftovers(root: PathLike) -> list[str]:
    """Tidy what interrupted saves of dead owners left in `root`: remove their `.partial` folders and `latest`
    temporaries, and put back a checkpoint whose replacement was cut off; one line per thing done."""
    root, done = Path(root), []
    if not root.is_dir():
        return done
    for child in sorted(root.iterdir()):
        match = LEFTOVER.match(child.name)
        if match is None:
            continue
        if match.group(2) is None:
            child.unlink(missing_ok=True)
            continue
        step_name = child.name[1:].rsplit(".", 1)[0]
        if _in_progress(root / f".{step_name}.partial") is not None:
            continue
        final = root / step_name
        if match.group(2) == "old" and not final.exists():
            os.rename(child, final)
            done.append(f"put back {final}, whose replacement was interrupted")
        else:
            shutil.rmtree(child)
            done.append(f"removed {child}, left by an interrupted save")
    return done


def _prepare(root: Path, partial: Path, config: dict[str, Any]) -> bool:
    """Rank 0: create the root, tidy dead saves' leftovers, open a fresh `.partial` directory naming this process."""
    try:
        json.dumps(config)
    except (TypeError, ValueError) as error:
        raise InputError(f"checkpoint config is not JSON-serializable: {error}") from error
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
        partial.mkdir()
    except FileExistsError as error:
        owner = _in_progress(partial)
        raise CheckpointSaveError(
            f"{partial} is being written by another save ({owner.describe() if owner else '?'})"
            f": two runs are saving into {root}"
        ) from error
    except OSError as error:
        raise _save_error(error.filename or partial, error) from error
    try:
        write_owner(partial / OWNER, Owner.this_process())
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise _save_error(partial / OWNER, error) from error
    return True


def _manifest_files(
    records: list[list[int]], root_files: dict[str, dict[str, Any]], dtype: torch.dtype
) -> tuple[list, list, dict]:
    """(center entries, rank files, every file's size and sha256) from the gathered per-rank records."""
    centers, ranks, files = [], [], dict(root_files)
    width = 1 + _HASH_BYTES
    for rank, record in enumerate(records):
        start, end = record[0], record[1]
        metas = []
        for offset in (2, 2 + width):
            metas.append({"size": record[offset], "sha256": bytes(record[offset + 1 : offset + width]).hex()})
        centers_file, rank_file = centers_name(start, end), rank_name(rank)
        files[centers_file], files[rank_file] = metas
        centers.append(
            {"file": centers_file, "start": start, "end": end, "rank": rank, "dtype": str(dtype).replace("torch.", "")}
        )
        ranks.append(rank_file)
    return centers, ranks, files


def _publish(root: Path, partial: Path, manifest: dict[str, Any], keep: int) -> Path:
    """Rank 0: check every file arrived, write the manifest, rename into place; then point `latest` at it, prune."""
    for name, meta in manifest["files"].items():
        path = partial / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise CheckpointSaveError(
                f"{path} is not visible to rank 0 with {meta['size']} bytes: the checkpoint "
                "root must be a filesystem shared by every rank"
            )
    write_text_durably(partial / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    final = root / step_dir_name(manifest["step"])
    replaced = root / f".{final.name}.old"
    try:
        fsync_path(partial)
        (partial / OWNER).unlink()
        if final.exists():
            os.rename(final, replaced)
        try:
            os.rename(partial, final)
        except OSError:
            if replaced.exists():
                os.rename(replaced, final)
            raise
    except OSError as error:
        raise _save_error(error.filename or final, error) from error
    fsync_path(root)
    _tidy_after_publish(root, final, replaced, keep)
    return final


def _tidy_after_publish(root: Path, final: Path, replaced: Path, keep: int) -> None:
    """Point `latest` at `final`, drop the checkpoint it replaced, prune; the checkpoint is saved, so a failure
    here only warns."""
    try:
        with atomic_path(root / LATEST, durable=True) as temporary:
            Path(temporary).write_text(final.name + "\n", encoding="utf-8")
        if replaced.exists():
            shutil.rmtree(replaced)
        _prune(root, keep, final)
    except OSError as error:
        print_line(
            f"partial-fc: warning: checkpoint {final} is saved, but tidying {root} failed: cannot write "
            f"{error.filename}: {os_error_cause(error)}"
        )


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete complete checkpoints saved before the newest `keep`, never `current` nor one with an unreadable
    manifest (left for a person to look at)."""
    readable = [path for path, sequence in checkpoints_newest_first(root) if sequence is not None]
    for path in readable[keep:]:
        if path != current:
            shutil.rmtree(path)


def save_checkpoint(
    root: PathLike,
    parts: TrainingParts,
    *,
    comm: Communicator,
    step: int,
    epoch: int,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write `parts` into `<root>/step_<step>/` from every rank (a collective), atomically; keep the newest `keep`
    checkpoints.

    `config` (JSON-serializable) goes into the manifest; `extra` (tensors, numbers, strings, lists, dicts) into
    the training state. Returns the checkpoint directory on every rank; a failure to write raises the same
    `CheckpointSaveError` on every rank, naming the file, the cause and the newest checkpoint left.
    """
    for name, value, minimum in (("step", step, 0), ("epoch", epoch, 0), ("keep", keep, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"save_checkpoint {name}={value!r} must be an integer >= {minimum}")
    root = Path(root)
    config, extra = dict(config or {}), dict(extra or {})
    partial = root / f".{step_dir_name(step)}.partial"

    def write() -> tuple[list[int], dict]:
        own = _write_rank_files(partial, comm, parts)
        if comm.rank != 0:
            return own, {}
        return own, _write_root_files(partial, step, epoch, parts, extra)

    def publish(records: list[list[int]], root_files: dict) -> str:
        head = parts.head
        centers, ranks, files = _manifest_files(records, root_files, head.weight.dtype)
        now = time.time()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "epoch": epoch,
            "world_size": comm.world_size,
            "sequence": next_sequence(root),
            "num_classes": head.num_classes,
            "embedding_size": head.embedding_size,
            "row_state": sorted(parts.row_state()),
            "centers": centers,
            "rank_files": ranks,
            "files": files,
            "config": config,
            "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            "created_unix": now,
            "partial_fc_version": partial_fc.__version__,
            "torch_version": torch.__version__,
        }
        return str(_publish(root, partial, manifest, keep))

    prepared = False
    try:
        prepared = run_on_root(comm, lambda: _prepare(root, partial, config), CheckpointError)
        record, root_files = on_every_rank(comm, write, CheckpointError)
        row = torch.tensor([record], dtype=torch.int64, device=comm.device)
        records = comm.all_gather(row, sizes=[1] * comm.world_size).tolist()
        return Path(run_on_root(comm, lambda: publish(records, root_files), CheckpointError))
    except PartialFCError as error:  # raised alike on every rank
        if prepared and comm.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, InputError):
            raise
        newest = find_latest(root)
        left = f"the newest checkpoint, {newest}, is intact" if newest else f"{root} holds no earlier checkpoint"
        removed = f"the unfinished {partial.name} was removed, and " if prepared else ""
        raise CheckpointSaveError(
            f"checkpoint {root / step_dir_name(step)} was not saved: {error}; {removed}{left}"
        ) from error
