"""A checkpoint's manifest, read and checked: its shape, its center shards' tiling, its fit to the running head,
and every file's size and sha256."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from partial_fc.comm import Communicator
from partial_fc.comm.agreement import on_every_rank, run_on_root
from partial_fc.engine.checkpoint.errors import CheckpointError, CorruptCheckpointError
from partial_fc.engine.checkpoint.find import resolve
from partial_fc.engine.checkpoint.layout import BACKBONE, BACKBONE_OPTIMIZER, FORMAT, MANIFEST, TRAINING, VERSION
from partial_fc.errors import InputError, MissingInputError
from partial_fc.fileio import PathLike, sha256_file


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
    expected = {
        "step": int,
        "epoch": int,
        "world_size": int,
        "num_classes": int,
        "embedding_size": int,
        "centers": list,
        "rank_files": list,
        "files": dict,
        "config": dict,
        "row_state": list,
    }
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CorruptCheckpointError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    if not isinstance(manifest.get("sequence", 0), int):
        raise CorruptCheckpointError(f"{path}: key 'sequence' is not an int")
    for name, meta in manifest["files"].items():
        if (
            Path(name).name != name
            or not isinstance(meta, dict)
            or not isinstance(meta.get("size"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            raise CorruptCheckpointError(
                f"{path}: file entry {name!r} must be a plain name with an integer size and a sha256"
            )
    for entry in manifest["centers"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("start"), int)
            and isinstance(entry.get("end"), int)
            and entry["file"] in manifest["files"]
        ):
            raise CorruptCheckpointError(f"{path}: center shard entry {entry!r} needs a listed file, start and end")
    if len(manifest["rank_files"]) != manifest["world_size"]:
        raise CorruptCheckpointError(
            f"{path}: {len(manifest['rank_files'])} rank files for world_size {manifest['world_size']}"
        )
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
            raise CorruptCheckpointError(
                f"{path}: center shard {entry['file']} [{entry['start']}, {entry['end']}) {what}"
            )
        covered = entry["end"]
    if covered != manifest["num_classes"]:
        raise CorruptCheckpointError(f"{path}: center shards cover [0, {covered}), not [0, {manifest['num_classes']})")


def _check_against_head(manifest: dict[str, Any], path: Path, head: nn.Module) -> None:
    for key in ("num_classes", "embedding_size"):
        if manifest[key] != getattr(head, key):
            hint = (
                f"; a checkpoint continues its own run: to fine-tune its backbone on this label set, start a "
                f"new run with init_weights={path.parent} (fresh centers) and resume off"
                if key == "num_classes"
                else ""
            )
            raise InputError(
                f"{path}: checkpoint has {key}={manifest[key]}, the running head has {key}={getattr(head, key)}{hint}"
            )


def _check_sizes(directory: Path, manifest: dict[str, Any]) -> None:
    for name, meta in sorted(manifest["files"].items()):
        file = directory / name
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint file {file} is missing (listed in {directory / MANIFEST})")
        size = file.stat().st_size
        if size != meta["size"]:
            raise CorruptCheckpointError(
                f"checkpoint file {file} has {size} bytes, the manifest says {meta['size']}: truncated or overwritten"
            )


def _check_hashes(directory: Path, manifest: dict[str, Any], names: list[str]) -> None:
    for name in names:
        if sha256_file(directory / name) != manifest["files"][name]["sha256"]:
            raise CorruptCheckpointError(
                f"checkpoint file {directory / name} is corrupt: its sha256 differs from the manifest's"
            )


def open_checkpoint(comm: Communicator, path: PathLike, head: nn.Module | None) -> tuple[Path, dict]:
    """Resolve and validate on rank 0 (sizes), verify hashes spread over the ranks; the same verdict everywhere."""

    def validate() -> tuple[str, dict]:
        directory = resolve(path)
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


def backbone_weights_file(path: PathLike) -> Path:
    """The backbone weights file `path` names: the `backbone.pt` of a checkpoint folder (or of a root's newest
    checkpoint), checked against its manifest; else `path` itself (a plain `.pth` state dict)."""
    path = Path(path)
    if not path.is_dir():
        return path
    directory = resolve(path)
    manifest = _read_manifest(directory)
    _check_sizes(directory, {"files": {BACKBONE: manifest["files"][BACKBONE]}})
    _check_hashes(directory, manifest, [BACKBONE])
    return directory / BACKBONE
