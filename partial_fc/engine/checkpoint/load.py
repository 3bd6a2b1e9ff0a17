"""Loading a checkpoint into a run on any number of ranks: each new shard's rows read from the overlapping saved
shards only, the random generators restored (or re-seeded on another world size), the sampler moved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from partial_fc.backbones.weights import strip_module_prefix
from partial_fc.comm import Communicator
from partial_fc.comm.agreement import on_every_rank, run_on_root
from partial_fc.engine.checkpoint.errors import CheckpointError, CorruptCheckpointError
from partial_fc.engine.checkpoint.find import candidates
from partial_fc.engine.checkpoint.layout import BACKBONE, BACKBONE_OPTIMIZER, TRAINING
from partial_fc.engine.checkpoint.manifest import open_checkpoint
from partial_fc.engine.checkpoint.mapped import copy_mapped_rows
from partial_fc.engine.checkpoint.parts import TrainingParts
from partial_fc.engine.checkpoint.rng import reseed, restore_rng
from partial_fc.errors import InputError
from partial_fc.fileio import PathLike, load_torch_file


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


def _open_newest_valid(comm: Communicator, path: PathLike, parts: TrainingParts) -> tuple[Path, dict, list[str]]:
    """Open the checkpoint `path` names, or the newest valid one under the root `path`, passing over corrupt ones
    (each with its reason, returned); every rank takes the same decisions."""
    explicit, found = run_on_root(comm, lambda: candidates(path), CheckpointError)
    skipped: list[str] = []
    for candidate in found:
        try:
            directory, manifest = open_checkpoint(comm, candidate, parts.head)
            return directory, manifest, skipped
        except CorruptCheckpointError as error:
            if explicit:
                raise
            skipped.append(str(error))
    raise CorruptCheckpointError(f"no valid checkpoint in {path}: " + "; ".join(skipped))


def _check_shard(data: Any, entry: dict[str, Any], path: Path, width: int, row_keys: list[str]) -> None:
    rows = entry["end"] - entry["start"]
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("weight"), torch.Tensor)
        or tuple(data["weight"].shape) != (rows, width)
    ):
        raise InputError(f"{path} does not hold a [{rows}, {width}] center shard under 'weight'")
    state = data.get("row_state")
    if (
        not isinstance(state, dict)
        or sorted(state) != sorted(row_keys)
        or any(
            not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows
            for value in state.values()
        )
    ):
        raise InputError(f"{path}: per-row optimizer state must be {row_keys} with {rows} rows each")
    if not isinstance(data.get("scalar_state"), dict) or not isinstance(data.get("param_groups"), list):
        raise InputError(f"{path}: scalar optimizer state or param_groups missing")


def _check_row_state_fits(directory: Path, manifest: dict[str, Any], parts: TrainingParts) -> None:
    """The saved per-row optimizer state must be what the head optimizer keeps (when it keeps any, or always for
    one whose state is fixed at construction, as SparseSGD's), with the same kind of dtype and row shape."""
    kept = parts.row_state()
    saved = sorted(manifest["row_state"])
    if (kept or getattr(parts.head_optimizer, "row_state_is_fixed", False)) and saved != sorted(kept):
        raise InputError(
            f"{directory}: the head optimizer's per-row state was saved as {saved or 'nothing'}, this one keeps "
            f"{sorted(kept) or 'nothing'}: resume with the optimizer, momentum and momentum_dtype it was saved with "
            "(momentum_buffer: momentum_dtype=storage; momentum_code, momentum_absmax: int8; nothing: none)"
        )


def _check_row_tensor(path: Path, key: str, saved: torch.Tensor, target: torch.Tensor) -> None:
    """A saved per-row tensor must fit the optimizer's: its row shape, and its dtype unless both are floats."""
    if tuple(saved.shape[1:]) != tuple(target.shape[1:]):
        raise InputError(
            f"{path}: per-row optimizer state {key!r} has rows of shape {tuple(saved.shape[1:])}, "
            f"the head optimizer's has {tuple(target.shape[1:])}"
        )
    if saved.dtype != target.dtype and not (saved.dtype.is_floating_point and target.dtype.is_floating_point):
        raise InputError(
            f"{path}: per-row optimizer state {key!r} is {str(saved.dtype).replace('torch.', '')}, "
            f"the head optimizer keeps it as {str(target.dtype).replace('torch.', '')}"
        )


def _load_centers(directory: Path, manifest: dict[str, Any], parts: TrainingParts) -> None:
    """Fill this rank's shard and its per-row optimizer state from the overlapping saved shards (memory-mapped)."""
    head, head_optimizer = parts.head, parts.head_optimizer
    state = parts.center_state()
    _check_row_state_fits(directory, manifest, parts)
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
            copy_mapped_rows(head.weight[target_rows], data["weight"][source])
            for key, saved in data["row_state"].items():
                if key not in targets:
                    existing = state.get(key)
                    if parts.is_row_state(existing):  # filled in place: no second copy of the state
                        _check_row_tensor(path, key, saved, existing)
                        targets[key] = existing
                    else:
                        shape = (head.num_local, *saved.shape[1:])
                        targets[key] = torch.empty(shape, dtype=saved.dtype, device=head.weight.device)
                _check_row_tensor(path, key, saved, targets[key])
                copy_mapped_rows(targets[key][target_rows], saved[source])
        if scalars is None:
            scalars, groups = data["scalar_state"], data["param_groups"]
        del data
    if len(groups) != len(head_optimizer.param_groups):
        raise InputError(
            f"{directory}: the head optimizer was saved with {len(groups)} param groups, "
            f"this one has {len(head_optimizer.param_groups)}"
        )
    state.update(targets)
    state.update(scalars)
    for group, saved in zip(head_optimizer.param_groups, groups):
        group.update({key: value for key, value in saved.items() if key != "params"})


def _restore_sampler(
    sampler: Any, saved: dict | None, saved_world: int, epoch: int, comm: Communicator, state: TrainingState
) -> None:
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
            state.notes.append(
                f"sampler: {consumed} samples of epoch {saved.get('epoch', epoch)} were consumed; "
                f"continuing from {position * comm.world_size} ({skipped} will be seen again)"
            )
        return
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    state.sampler_restarted = True
    state.notes.append(
        f"sampler state cannot move from {saved_world} to {comm.world_size} ranks: "
        f"epoch {epoch} restarts from its beginning"
    )


def load_checkpoint(
    path: PathLike, parts: TrainingParts, *, comm: Communicator, seed: int | None = None
) -> TrainingState:
    """Restore `parts` from `path` on every rank (a collective): a checkpoint folder exactly, or a root's newest
    valid checkpoint (a corrupt newer one is passed over and reported in `TrainingState.skipped`).

    On another world size the centers are resharded and the RNGs re-seeded from (`seed`, step, rank);
    `seed` defaults to the saved config's "seed", else 0. Every rank raises the same error on bad files.
    """
    directory, manifest, skipped = _open_newest_valid(comm, path, parts)
    saved_world = manifest["world_size"]
    head = parts.head

    def restore() -> TrainingState:
        training = load_torch_file(directory / TRAINING)
        backbone_state = load_torch_file(directory / BACKBONE)
        try:
            parts.plain_backbone.load_state_dict(strip_module_prefix(backbone_state))
        except RuntimeError as error:
            raise InputError(f"{directory / BACKBONE} does not fit the backbone: {error}") from error
        try:
            parts.backbone_optimizer.load_state_dict(load_torch_file(directory / BACKBONE_OPTIMIZER))
        except (ValueError, KeyError) as error:
            file = directory / BACKBONE_OPTIMIZER
            raise InputError(f"{file} does not fit the backbone optimizer: {error}") from error
        if parts.scheduler is not None and training["scheduler"] is not None:
            parts.scheduler.load_state_dict(training["scheduler"])
        if parts.scaler is not None and training["scaler"] is not None:
            parts.scaler.load_state_dict(training["scaler"])
        _load_centers(directory, manifest, parts)
        same_shards = (head.class_start, head.class_start + head.num_local) in {
            (entry["start"], entry["end"]) for entry in manifest["centers"]
        }
        state = TrainingState(
            step=training["step"],
            epoch=training["epoch"],
            config=manifest["config"],
            extra=training["extra"],
            resharded=saved_world != comm.world_size or not same_shards,
            path=directory,
            saved_world_size=saved_world,
            skipped=skipped,
        )
        if saved_world == comm.world_size:
            ranked = load_torch_file(directory / manifest["rank_files"][comm.rank])
            restore_rng(ranked["rng"], comm, head)
        else:
            ranked = load_torch_file(directory / manifest["rank_files"][0])
            chosen = seed if seed is not None else int(manifest["config"].get("seed", 0))
            reseed(chosen, state.step, comm, head)
            state.rng_restored = False
            state.notes.append(
                f"world size changed from {saved_world} to {comm.world_size}: centers resharded, "
                f"random generators re-seeded from (seed={chosen}, step={state.step}, rank)"
            )
        if parts.sampler is not None:
            _restore_sampler(parts.sampler, ranked["sampler"], saved_world, state.epoch, comm, state)
        return state

    return on_every_rank(comm, restore, CheckpointError)
