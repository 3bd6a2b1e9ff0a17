"""Training checkpoints that survive crashes and changes of the number of ranks.

A checkpoint is the directory `<root>/step_<8-digit step>/`: `manifest.json` (written last), `backbone.pt`,
`backbone_optimizer.pt`, `training.pt` (step, epoch, scheduler, loss scaler, extra), one
`centers_<start>-<end>.pt` per rank (its rows of the class centers and of every per-row optimizer tensor)
and one `rank_<k>.pt` per rank (sampler position and RNG states). Every rank writes into
`<root>/.step_<N>.partial/` (which names its owner, see `run_lock`); rank 0 checks the files, writes the manifest
and renames the directory, so a kill at any point leaves the previous checkpoints whole, and a failed save
removes its own `.partial` folder and raises `CheckpointSaveError` on every rank. A checkpoint is newer when it
was saved later: each manifest holds a save `sequence` one above every checkpoint in the root, so after a resume
from an older checkpoint into the same root the new line's checkpoints win over the abandoned ones (pruning
goes by the same order). `<root>/latest` names the newest one for people and other tools; resume ignores it.

Loading on another number of ranks reads each new shard's rows from the overlapping saved shards only.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import math
import mmap
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import partial_fc
from partial_fc.comm import Communicator
from partial_fc.comm.agreement import on_every_rank, run_on_root
from partial_fc.engine.run_lock import Owner, read_owner, write_owner
from partial_fc.errors import InputError, MissingInputError, PartialFCError
from partial_fc.fileio import (PathLike, atomic_path, fsync_path, load_torch_file, os_error_cause, save_durably, sha256_file,
                               write_text_durably)
from partial_fc.progress import print_line

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "TrainingState",
    "clean_leftovers",
    "find_latest",
    "load_backbone_state",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "partial_fc.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
BACKBONE = "backbone.pt"
BACKBONE_OPTIMIZER = "backbone_optimizer.pt"
TRAINING = "training.pt"
OWNER = ".owner"  # in a `.partial` folder: the process writing it (removed before the rename)
STEP_DIR = re.compile(r"^step_(\d{8,})$")
LEFTOVER = re.compile(r"^\.(step_\d{8,}\.(partial|old)|latest\..*\.tmp)$")
_HASH_BYTES = 32
_LOAD_BLOCK_BYTES = 64 << 20  # a saved shard is copied into the live one this much at a time
# Keys under which arcface_torch and common trainers nest a backbone's state dict inside a checkpoint file.
_NESTED_STATE_KEYS = ("state_dict_backbone", "state_dict")


class CheckpointError(PartialFCError):
    """A checkpoint could not be written or read for a reason other than bad input (disk full, unshared root)."""


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, read-only or unwritable folder...); its `.partial` is gone, the older ones intact."""


class CorruptCheckpointError(InputError):
    """A checkpoint's files do not match its manifest (truncated, changed, missing) or its manifest is unreadable."""


@dataclass
class TrainingState:
    """Where a loaded checkpoint leaves training, and what could not be restored exactly (see `notes`)."""

    step: int
    epoch: int
    config: dict[str, Any]
    extra: dict[str, Any]
    resharded: bool
    path: Path
    saved_world_size: int
    sampler_restarted: bool = False
    rng_restored: bool = True
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # newer checkpoints passed over as corrupt, why each


def step_dir_name(step: int) -> str:
    """`step_00001234`: the directory name of the checkpoint taken after `step` steps."""
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------------------ file helpers


def _save_error(path: Any, error: BaseException) -> CheckpointSaveError:
    return CheckpointSaveError(f"cannot write {path}: {os_error_cause(error)}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


# ------------------------------------------------------------------------------------------------- saving


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _is_row_state(value: Any, head: nn.Module) -> bool:
    """Optimizer state with one entry per center row (momentum, exp_avg, ...): resharded with the centers."""
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == head.num_local


def _optimizer_row_split(head: nn.Module, head_optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(per-row state tensors, everything else) of the head optimizer's state for the shard."""
    params = [param for group in head_optimizer.param_groups for param in group["params"]]
    if len(params) != 1 or params[0] is not head.weight:
        raise InputError("the head optimizer must optimize exactly the head's center shard (head.weight)")
    rows, scalars = {}, {}
    for key, value in head_optimizer.state[head.weight].items():
        if _is_row_state(value, head):
            rows[key] = _cpu(value)
        else:
            scalars[key] = _cpu(value) if isinstance(value, torch.Tensor) else value
    return rows, scalars


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _rank_state(comm: Communicator, head: nn.Module, sampler: Any) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(comm.device) if comm.device.type == "cuda" else None
    return {
        "rank": comm.rank,
        "world_size": comm.world_size,
        "sampler": sampler.state_dict() if sampler is not None else None,
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": _numpy_rng_state(),
                "python": random.getstate(), "head": head.generator.get_state()},
    }


def _centers_name(start: int, end: int) -> str:
    return f"centers_{start}-{end}.pt"


def _write_rank_files(partial: Path, comm: Communicator, head: nn.Module, head_optimizer, sampler) -> list[int]:
    """Write this rank's centers and rank file; returns [start, end, size, *sha, size, *sha] for the gather."""
    rows, scalars = _optimizer_row_split(head, head_optimizer)
    start, end = head.class_start, head.class_start + head.num_local
    groups = [{k: v for k, v in group.items() if k != "params"} for group in head_optimizer.param_groups]
    centers = {"start": start, "end": end, "weight": _cpu(head.weight), "row_state": rows,
               "scalar_state": scalars, "param_groups": groups}
    record = [start, end]
    rank_state = _rank_state(comm, head, sampler)
    for name, payload in ((_centers_name(start, end), centers), (f"rank_{comm.rank}.pt", rank_state)):
        meta = save_durably(payload, partial / name)
        record += [meta["size"], *bytes.fromhex(meta["sha256"])]
    return record


def _write_root_files(partial: Path, step: int, epoch: int, backbone, backbone_optimizer, scheduler, scaler,
                      extra) -> dict[str, dict[str, Any]]:
    """Rank 0's files: backbone, its optimizer and the training state; returns their sizes and hashes."""
    scaler_state = scaler.state_dict() if scaler is not None else None
    training = {"step": step, "epoch": epoch, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler_state or None, "extra": extra}
    files = {
        BACKBONE: save_durably(_strip_module_prefix(_unwrap(backbone).state_dict()), partial / BACKBONE),
        BACKBONE_OPTIMIZER: save_durably(backbone_optimizer.state_dict(), partial / BACKBONE_OPTIMIZER),
        TRAINING: save_durably(training, partial / TRAINING),
    }
    try:
        torch.load(partial / TRAINING, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported as the caller's bad `extra` or scheduler state
        raise InputError(f"the training state (extra, scheduler or scaler) cannot be loaded with "
                         f"weights_only=True; keep `extra` to tensors, numbers, strings, lists and dicts: {error}")
    return files


def _in_progress(partial: Path) -> Optional[Owner]:
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
        raise CheckpointSaveError(f"{partial} is being written by another save ({owner.describe() if owner else '?'})"
                                  f": two runs are saving into {root}") from error
    except OSError as error:
        raise _save_error(error.filename or partial, error) from error
    try:
        write_owner(partial / OWNER, Owner.this_process())
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise _save_error(partial / OWNER, error) from error
    return True


def _manifest_files(records: list[list[int]], root_files: dict[str, dict[str, Any]],
                    dtype: torch.dtype) -> tuple[list, list, dict]:
    """(center entries, rank files, every file's size and sha256) from the gathered per-rank records."""
    centers, ranks, files = [], [], dict(root_files)
    width = 1 + _HASH_BYTES
    for rank, record in enumerate(records):
        start, end = record[0], record[1]
        metas = []
        for offset in (2, 2 + width):
            metas.append({"size": record[offset], "sha256": bytes(record[offset + 1 : offset + width]).hex()})
        centers_name, rank_name = _centers_name(start, end), f"rank_{rank}.pt"
        files[centers_name], files[rank_name] = metas
        centers.append({"file": centers_name, "start": start, "end": end, "rank": rank,
                        "dtype": str(dtype).replace("torch.", "")})
        ranks.append(rank_name)
    return centers, ranks, files


def _publish(root: Path, partial: Path, manifest: dict[str, Any], keep: int) -> Path:
    """Rank 0: check every file arrived, write the manifest, rename into place; then point `latest` at it, prune."""
    for name, meta in manifest["files"].items():
        path = partial / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise CheckpointSaveError(f"{path} is not visible to rank 0 with {meta['size']} bytes: the checkpoint "
                                      "root must be a filesystem shared by every rank")
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
        print_line(f"partial-fc: warning: checkpoint {final} is saved, but tidying {root} failed: cannot write "
                   f"{error.filename}: {os_error_cause(error)}")


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete complete checkpoints saved before the newest `keep`, never `current` nor one with an unreadable
    manifest (left for a person to look at)."""
    readable = [path for path, sequence in _checkpoints_newest_first(root) if sequence is not None]
    for path in readable[keep:]:
        if path != current:
            shutil.rmtree(path)


def save_checkpoint(
    root: PathLike,
    *,
    comm: Communicator,
    step: int,
    epoch: int,
    backbone: nn.Module,
    backbone_optimizer: torch.optim.Optimizer,
    head: nn.Module,
    head_optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    sampler: Any = None,
    scaler: Any = None,
    config: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
    keep: int = 3,
) -> Path:
    """Write `<root>/step_<step>/` from every rank (a collective), atomically; keep the newest `keep` checkpoints.

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
        own = _write_rank_files(partial, comm, head, head_optimizer, sampler)
        if comm.rank != 0:
            return own, {}
        return own, _write_root_files(partial, step, epoch, backbone, backbone_optimizer, scheduler, scaler, extra)

    def publish(records: list[list[int]], root_files: dict) -> str:
        centers, ranks, files = _manifest_files(records, root_files, head.weight.dtype)
        now = time.time()
        manifest = {
            "format": FORMAT, "version": VERSION, "step": step, "epoch": epoch, "world_size": comm.world_size,
            "sequence": _next_sequence(root),
            "num_classes": head.num_classes, "embedding_size": head.embedding_size,
            "row_state": sorted(key for key, value in head_optimizer.state[head.weight].items()
                                if _is_row_state(value, head)),
            "centers": centers, "rank_files": ranks, "files": files, "config": config,
            "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            "created_unix": now, "partial_fc_version": partial_fc.__version__, "torch_version": torch.__version__,
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
        raise CheckpointSaveError(f"checkpoint {root / step_dir_name(step)} was not saved: {error}; {removed}{left}"
                                  ) from error


# ----------------------------------------------------------------------------------------------- finding


def _sequence(directory: Path) -> Optional[int]:
    """The save sequence in `directory`'s manifest (0 for manifests from before it existed); None if unreadable."""
    try:
        sequence = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("sequence", 0)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None


def _checkpoints_newest_first(root: Path) -> list[tuple[Path, Optional[int]]]:
    """Complete checkpoints (`step_*` folders holding a manifest: only a finished save renames one into place) with
    their save sequence, the last saved first (then the higher step); unreadable manifests come first, to be
    reported and passed over rather than hidden."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((child, _sequence(child), int(match.group(1))))
    found.sort(key=lambda item: (math.inf if item[1] is None else item[1], item[2]), reverse=True)
    return [(path, sequence) for path, sequence, _ in found]


def _next_sequence(root: Path) -> int:
    return 1 + max((sequence for _, sequence in _checkpoints_newest_first(root) if sequence is not None), default=0)


def find_latest(root: PathLike) -> Optional[Path]:
    """The newest complete checkpoint under `root` (saved last, whatever its step; `latest` is only a hint for
    people), `root` itself if it is one, or None."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    complete = _checkpoints_newest_first(root)
    return complete[0][0] if complete else None


def _resolve(path: PathLike) -> Path:
    path = Path(path)
    found = find_latest(path)
    if found is not None:
        return found
    if STEP_DIR.match(path.name) and path.is_dir():
        raise MissingInputError(f"checkpoint manifest {path / MANIFEST} is missing (the save did not finish)")
    raise MissingInputError(f"no complete checkpoint in {path}")


# ----------------------------------------------------------------------------------------------- validation


def _read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of `directory`, checked for shape; MissingInputError when missing, CorruptCheckpointError naming
    it when unreadable or malformed, InputError when written by another format version."""
    path = directory / MANIFEST
    if not path.is_file():
        raise MissingInputError(f"checkpoint manifest {path} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CorruptCheckpointError(f"checkpoint manifest {path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path} is not a partial_fc checkpoint manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise InputError(f"{path} has checkpoint format version {manifest.get('version')!r}; this code reads {VERSION}")
    expected = {"step": int, "epoch": int, "world_size": int, "num_classes": int, "embedding_size": int,
                "centers": list, "rank_files": list, "files": dict, "config": dict, "row_state": list}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CorruptCheckpointError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    if not isinstance(manifest.get("sequence", 0), int):
        raise CorruptCheckpointError(f"{path}: key 'sequence' is not an int")
    for name, meta in manifest["files"].items():
        if Path(name).name != name or not isinstance(meta, dict) or not isinstance(meta.get("size"), int) \
                or not isinstance(meta.get("sha256"), str):
            raise CorruptCheckpointError(f"{path}: file entry {name!r} must be a plain name with an integer size "
                                         "and a sha256")
    for entry in manifest["centers"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("start"), int)
                and isinstance(entry.get("end"), int) and entry["file"] in manifest["files"]):
            raise CorruptCheckpointError(f"{path}: center shard entry {entry!r} needs a listed file, start and end")
    if len(manifest["rank_files"]) != manifest["world_size"]:
        raise CorruptCheckpointError(f"{path}: {len(manifest['rank_files'])} rank files for world_size "
                                     f"{manifest['world_size']}")
    for name in [BACKBONE, BACKBONE_OPTIMIZER, TRAINING, *manifest["rank_files"]]:
        if not isinstance(name, str) or name not in manifest["files"]:
            raise CorruptCheckpointError(f"{path}: file {name!r} is not listed")
    return manifest


def _check_coverage(manifest: dict[str, Any], path: Path) -> None:
    """The center shards must tile [0, num_classes) exactly: no gap, no overlap."""
    covered = 0
    for entry in sorted(manifest["centers"], key=lambda item: (item["start"], item["end"])):
        if entry["start"] != covered or entry["end"] <= entry["start"]:
            what = f"leaves [{covered}, {entry['start']}) uncovered"
            if entry["start"] < covered:
                what = "overlaps the previous one"
            elif entry["start"] == covered:
                what = "is empty"
            raise CorruptCheckpointError(f"{path}: center shard {entry['file']} [{entry['start']}, {entry['end']}) "
                                         f"{what}")
        covered = entry["end"]
    if covered != manifest["num_classes"]:
        raise CorruptCheckpointError(f"{path}: center shards cover [0, {covered}), not [0, {manifest['num_classes']})")


def _check_against_head(manifest: dict[str, Any], path: Path, head: nn.Module) -> None:
    for key in ("num_classes", "embedding_size"):
        if manifest[key] != getattr(head, key):
            hint = (f"; a checkpoint continues its own run: to fine-tune its backbone on this label set, start a "
                    f"new run with init_weights={path.parent} (fresh centers) and resume off"
                    if key == "num_classes" else "")
            raise InputError(f"{path}: checkpoint has {key}={manifest[key]}, the running head has "
                             f"{key}={getattr(head, key)}{hint}")


def _check_sizes(directory: Path, manifest: dict[str, Any]) -> None:
    for name, meta in sorted(manifest["files"].items()):
        file = directory / name
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint file {file} is missing (listed in {directory / MANIFEST})")
        size = file.stat().st_size
        if size != meta["size"]:
            raise CorruptCheckpointError(f"checkpoint file {file} has {size} bytes, the manifest says {meta['size']}: "
                             "truncated or overwritten")


def _check_hashes(directory: Path, manifest: dict[str, Any], names: list[str]) -> None:
    for name in names:
        if sha256_file(directory / name) != manifest["files"][name]["sha256"]:
            raise CorruptCheckpointError(f"checkpoint file {directory / name} is corrupt: its sha256 differs from "
                                         "the manifest's")


def _open_checkpoint(comm: Communicator, path: PathLike, head: Optional[nn.Module]) -> tuple[Path, dict]:
    """Resolve and validate on rank 0 (sizes), verify hashes spread over the ranks; the same verdict everywhere."""

    def validate() -> tuple[str, dict]:
        directory = _resolve(path)
        manifest = _read_manifest(directory)
        if head is not None:
            _check_against_head(manifest, directory / MANIFEST, head)
        _check_coverage(manifest, directory / MANIFEST)
        _check_sizes(directory, manifest)
        return str(directory), manifest

    directory, manifest = run_on_root(comm, validate, CheckpointError)
    directory = Path(directory)
    mine = sorted(manifest["files"])[comm.rank :: comm.world_size]
    on_every_rank(comm, lambda: _check_hashes(directory, manifest, mine), CheckpointError)
    return directory, manifest


def _candidates(path: PathLike) -> tuple[bool, list[str]]:
    """(named explicitly, checkpoints to try in order): `path` itself when it is a checkpoint folder, else the
    complete checkpoints under it, newest first."""
    path = Path(path)
    if (path / MANIFEST).is_file() or STEP_DIR.match(path.name):
        return True, [str(path)]
    found = [str(directory) for directory, _ in _checkpoints_newest_first(path)]
    if not found:
        raise MissingInputError(f"no complete checkpoint in {path}")
    return False, found


def _open_newest_valid(comm: Communicator, path: PathLike, head: nn.Module) -> tuple[Path, dict, list[str]]:
    """Open the checkpoint `path` names, or the newest valid one under the root `path`, passing over corrupt ones
    (each with its reason, returned); every rank takes the same decisions."""
    explicit, candidates = run_on_root(comm, lambda: _candidates(path), CheckpointError)
    skipped: list[str] = []
    for candidate in candidates:
        try:
            directory, manifest = _open_checkpoint(comm, candidate, head)
            return directory, manifest, skipped
        except CorruptCheckpointError as error:
            if explicit:
                raise
            skipped.append(str(error))
    raise CorruptCheckpointError(f"no valid checkpoint in {path}: " + "; ".join(skipped))


# ------------------------------------------------------------------------------------------------- loading


def _check_shard(data: Any, entry: dict[str, Any], path: Path, width: int, row_keys: list[str]) -> None:
    rows = entry["end"] - entry["start"]
    if not isinstance(data, dict) or not isinstance(data.get("weight"), torch.Tensor) \
            or tuple(data["weight"].shape) != (rows, width):
        raise InputError(f"{path} does not hold a [{rows}, {width}] center shard under 'weight'")
    state = data.get("row_state")
    if not isinstance(state, dict) or sorted(state) != sorted(row_keys) or any(
            not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows
            for value in state.values()):
        raise InputError(f"{path}: per-row optimizer state must be {row_keys} with {rows} rows each")
    if not isinstance(data.get("scalar_state"), dict) or not isinstance(data.get("param_groups"), list):
        raise InputError(f"{path}: scalar optimizer state or param_groups missing")


def _check_row_state_fits(directory: Path, manifest: dict[str, Any], head: nn.Module, head_optimizer) -> None:
    """The saved per-row optimizer state must be what the head optimizer keeps (when it keeps any, or always for
    one whose state is fixed at construction, as SparseSGD's), with the same kind of dtype and row shape."""
    state = head_optimizer.state[head.weight]
    kept = {key: value for key, value in state.items() if _is_row_state(value, head)}
    saved = sorted(manifest["row_state"])
    if (kept or getattr(head_optimizer, "row_state_is_fixed", False)) and saved != sorted(kept):
        raise InputError(
            f"{directory}: the head optimizer's per-row state was saved as {saved or 'nothing'}, this one keeps "
            f"{sorted(kept) or 'nothing'}: resume with the optimizer, momentum and momentum_dtype it was saved with "
            "(momentum_buffer: momentum_dtype=storage; momentum_code, momentum_absmax: int8; nothing: none)")


def _check_row_tensor(path: Path, key: str, saved: torch.Tensor, target: torch.Tensor) -> None:
    """A saved per-row tensor must fit the optimizer's: its row shape, and its dtype unless both are floats."""
    if tuple(saved.shape[1:]) != tuple(target.shape[1:]):
        raise InputError(f"{path}: per-row optimizer state {key!r} has rows of shape {tuple(saved.shape[1:])}, "
                         f"the head optimizer's has {tuple(target.shape[1:])}")
    if saved.dtype != target.dtype and not (saved.dtype.is_floating_point and target.dtype.is_floating_point):
        raise InputError(f"{path}: per-row optimizer state {key!r} is {str(saved.dtype).replace('torch.', '')}, "
                         f"the head optimizer keeps it as {str(target.dtype).replace('torch.', '')}")


def _madvise() -> Any:
    """libc's madvise, or None where it cannot be called."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _madvise()


def _release_mapped_pages(tensor: torch.Tensor) -> None:
    """Unmap the pages lying wholly inside a memory-mapped, already copied `tensor` from this process (they stay
    in the page cache, and would be read from the file again if touched), so they leave its resident set."""
    if _MADVISE is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _MADVISE(first, last - first, mmap.MADV_DONTNEED)


def _copy_mapped_rows(target: torch.Tensor, source: torch.Tensor) -> None:
    """target.copy_(source), where `source` is rows of a checkpoint file memory-mapped by `load_torch_file(mmap=True)` (and
    only such: released anonymous pages would read back as zeros): a block of rows at a time, each block's pages
    released once copied, so loading a shard never holds the saved one beside it."""
    if source.dim() == 0 or source.shape[0] == 0:
        target.copy_(source)
        return
    rows = max(1, _LOAD_BLOCK_BYTES // max(1, source[0].numel() * source.element_size()))
    for start in range(0, source.shape[0], rows):
        block = source[start : start + rows]
        target[start : start + rows].copy_(block)
        _release_mapped_pages(block)


def _load_centers(directory: Path, manifest: dict[str, Any], head: nn.Module, head_optimizer) -> None:
    """Fill this rank's shard and its per-row optimizer state from the overlapping saved shards (memory-mapped)."""
    _optimizer_row_split(head, head_optimizer)
    _check_row_state_fits(directory, manifest, head, head_optimizer)
    state = head_optimizer.state[head.weight]
    first, last = head.class_start, head.class_start + head.num_local
    targets: dict[str, torch.Tensor] = {}
    scalars, groups = None, None
    for entry in manifest["centers"]:
        lo, hi = max(first, entry["start"]), min(last, entry["end"])
        if lo >= hi:
            continue
        path = directory / entry["file"]
        data = load_torch_file(path, mmap=True)
        _check_shard(data, entry, path, head.embedding_size, manifest["row_state"])
        source = slice(lo - entry["start"], hi - entry["start"])
        target_rows = slice(lo - first, hi - first)
        with torch.no_grad():
            _copy_mapped_rows(head.weight[target_rows], data["weight"][source])
            for key, saved in data["row_state"].items():
                if key not in targets:
                    existing = state.get(key)
                    if _is_row_state(existing, head):  # filled in place: no second copy of the state
                        _check_row_tensor(path, key, saved, existing)
                        targets[key] = existing
                    else:
                        shape = (head.num_local, *saved.shape[1:])
                        targets[key] = torch.empty(shape, dtype=saved.dtype, device=head.weight.device)
                _check_row_tensor(path, key, saved, targets[key])
                _copy_mapped_rows(targets[key][target_rows], saved[source])
        if scalars is None:
            scalars, groups = data["scalar_state"], data["param_groups"]
        del data
    if len(groups) != len(head_optimizer.param_groups):
        raise InputError(f"{directory}: the head optimizer was saved with {len(groups)} param groups, "
                         f"this one has {len(head_optimizer.param_groups)}")
    state.update(targets)
    state.update(scalars)
    for group, saved in zip(head_optimizer.param_groups, groups):
        group.update({key: value for key, value in saved.items() if key != "params"})


def _derived_seed(seed: int, step: int, rank: int, stream: str) -> int:
    text = f"{seed}/{step}/{rank}/{stream}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def _restore_rng(rng: dict[str, Any], comm: Communicator, head: nn.Module) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and comm.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], comm.device)
    numpy_state = rng["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    head.generator.set_state(rng["head"])


def _reseed(seed: int, step: int, comm: Communicator, head: nn.Module) -> None:
    """Seed every generator from (seed, step, rank): reproducible, and distinct per rank."""
    torch.manual_seed(_derived_seed(seed, step, comm.rank, "torch"))
    np.random.seed(_derived_seed(seed, step, comm.rank, "numpy") % 2**32)
    random.seed(_derived_seed(seed, step, comm.rank, "python"))
    head.generator.manual_seed(_derived_seed(seed, step, comm.rank, "head"))


def _restore_sampler(sampler: Any, saved: Optional[dict], saved_world: int, epoch: int, comm: Communicator,
                     state: TrainingState) -> None:
    """Exact position on the same world size; else the same global position when the state allows, else epoch start."""
    if saved is None:
        state.notes.append("the checkpoint has no sampler state; the sampler was left as it is")
        return
    if saved_world == comm.world_size:
        sampler.load_state_dict(saved)
        return
    if "position" in saved and "world_size" in saved:
        consumed = int(saved["position"]) * int(saved["world_size"])
        position = min(consumed // comm.world_size, len(sampler))
        moved = {key: value for key, value in saved.items() if key != "world_size"}
        moved["position"] = position
        sampler.load_state_dict(moved)
        skipped = consumed - position * comm.world_size
        if skipped:
            state.notes.append(f"sampler: {consumed} samples of epoch {saved.get('epoch', epoch)} were consumed; "
                               f"continuing from {position * comm.world_size} ({skipped} will be seen again)")
        return
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    state.sampler_restarted = True
    state.notes.append(f"sampler state cannot move from {saved_world} to {comm.world_size} ranks: "
                       f"epoch {epoch} restarts from its beginning")


def load_checkpoint(
    path: PathLike,
    *,
    comm: Communicator,
    backbone: nn.Module,
    backbone_optimizer: torch.optim.Optimizer,
    head: nn.Module,
    head_optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    sampler: Any = None,
    scaler: Any = None,
    seed: Optional[int] = None,
) -> TrainingState:
    """Restore training from `path` on every rank (a collective): a checkpoint folder exactly, or a root's newest
    valid checkpoint (a corrupt newer one is passed over and reported in `TrainingState.skipped`).

    On another world size the centers are resharded and the RNGs re-seeded from (`seed`, step, rank);
    `seed` defaults to the saved config's "seed", else 0. Every rank raises the same error on bad files.
    """
    directory, manifest, skipped = _open_newest_valid(comm, path, head)
    saved_world = manifest["world_size"]

    def restore() -> TrainingState:
        training = load_torch_file(directory / TRAINING)
        backbone_state = load_torch_file(directory / BACKBONE)
        try:
            _unwrap(backbone).load_state_dict(_strip_module_prefix(backbone_state))
        except RuntimeError as error:
            raise InputError(f"{directory / BACKBONE} does not fit the backbone: {error}") from error
        try:
            backbone_optimizer.load_state_dict(load_torch_file(directory / BACKBONE_OPTIMIZER))
        except (ValueError, KeyError) as error:
            file = directory / BACKBONE_OPTIMIZER
            raise InputError(f"{file} does not fit the backbone optimizer: {error}") from error
        if scheduler is not None and training["scheduler"] is not None:
            scheduler.load_state_dict(training["scheduler"])
        if scaler is not None and training["scaler"] is not None:
            scaler.load_state_dict(training["scaler"])
        _load_centers(directory, manifest, head, head_optimizer)
        same_shards = (head.class_start, head.class_start + head.num_local) in {
            (entry["start"], entry["end"]) for entry in manifest["centers"]}
        state = TrainingState(step=training["step"], epoch=training["epoch"], config=manifest["config"],
                              extra=training["extra"], resharded=saved_world != comm.world_size or not same_shards,
                              path=directory, saved_world_size=saved_world, skipped=skipped)
        if saved_world == comm.world_size:
            ranked = load_torch_file(directory / manifest["rank_files"][comm.rank])
            _restore_rng(ranked["rng"], comm, head)
        else:
            ranked = load_torch_file(directory / manifest["rank_files"][0])
            chosen = seed if seed is not None else int(manifest["config"].get("seed", 0))
            _reseed(chosen, state.step, comm, head)
            state.rng_restored = False
            state.notes.append(f"world size changed from {saved_world} to {comm.world_size}: centers resharded, "
                               f"random generators re-seeded from (seed={chosen}, step={state.step}, rank)")
        if sampler is not None:
            _restore_sampler(sampler, ranked["sampler"], saved_world, state.epoch, comm, state)
        return state

    return on_every_rank(comm, restore, CheckpointError)


def load_backbone_state(path: PathLike) -> dict[str, torch.Tensor]:
    """The backbone weights in a checkpoint directory, a checkpoint root (its latest) or a plain `.pth` state dict.

    A `module.` prefix (from DataParallel/DDP) is removed; anything that is not a state dict is an InputError.
    """
    path = Path(path)
    if path.is_dir():
        directory = _resolve(path)
        manifest = _read_manifest(directory)
        _check_sizes(directory, {"files": {BACKBONE: manifest["files"][BACKBONE]}})
        _check_hashes(directory, manifest, [BACKBONE])
        path = directory / BACKBONE
    elif not path.exists():
        raise MissingInputError(f"backbone weights {path} do not exist")
    state = load_torch_file(path)
    if isinstance(state, dict):
        for key in _NESTED_STATE_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise InputError(f"{path} is not a backbone state dict (a mapping of parameter names to tensors)")
    return _strip_module_prefix(state)
