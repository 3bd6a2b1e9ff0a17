"""Training configuration: insightface arcface_torch's Python config files, plus environment and --set overrides.

A config file is Python that builds `config = edict(); config.network = "r50"; ...`, exactly as in
arcface_torch. `load_config` layers DEFAULTS < the file < `PFC_<KEY>` environment variables < `--set key=value`,
parses text to each key's type, rejects unknown keys with a suggestion, and validates every value.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import logging
import math
import os
import runpy
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from easydict import EasyDict

from partial_fc.comm import BACKENDS, Communicator
from partial_fc.errors import InputError, MissingInputError
from partial_fc.heads.sparse_sgd import CENTER_MOMENTUM_CHOICES

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped in the package (pyproject package-data)
ENV_PREFIX = "PFC_"

DEFAULTS: dict[str, Any] = {
    # --- arcface_torch configs/base.py, same meanings and defaults ---
    "margin_list": (1.0, 0.5, 0.0),  # combined margin (m1, m2, m3): s*(cos(m1*t + m2) - m3); (1,0,0.4) is CosFace
    "network": "r50",  # backbone name in partial_fc.backbones
    "resume": False,  # continue from the newest checkpoint in `output`; "auto": only if there is one (restarts);
    # or a checkpoint folder (or a root of them) to continue from
    "save_all_states": False,  # also save head shards, optimizer and scheduler each epoch (needed for resume)
    "output": "ms1mv3_arcface_r50",  # run folder: logs, tensorboard, checkpoints; None -> work_dirs/<config name>
    "embedding_size": 512,  # backbone output features
    "sample_rate": 1.0,  # Partial FC: share of class centers sampled per step (1.0 = full softmax)
    "interclass_filtering_threshold": 0.0,  # drop negatives whose cosine exceeds this (0 = off)
    "fp16": False,  # mixed precision (in amp_dtype) for the backbone and head matmuls
    "batch_size": 128,  # samples per rank per step
    "optimizer": "sgd",  # sgd or adamw
    "lr": 0.1,  # peak learning rate (after warmup)
    "momentum": 0.9,  # SGD momentum
    "weight_decay": 5e-4,  # L2 / decoupled weight decay
    "verbose": 2000,  # run verification every this many steps
    "frequent": 10,  # log speed and loss every this many steps
    "dali": False,  # NVIDIA DALI loader (accepted, not implemented: the standard loader is used)
    "dali_aug": False,  # DALI augmentations (only with dali)
    "gradient_acc": 1,  # steps whose gradients are accumulated before one optimizer step
    "seed": 2048,  # global random seed
    "num_workers": 2,  # data loader worker processes per rank
    "wandb_key": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",  # Weights & Biases API key (redacted in logs)
    "suffix_run_name": None,  # suffix of the W&B run name
    "using_wandb": False,  # log to W&B (accepted, not implemented: tensorboard in `output` is used)
    "wandb_entity": "entity",  # W&B entity
    "wandb_project": "project",  # W&B project
    "wandb_log_all": True,  # W&B logging from every rank, not just rank 0
    "save_artifacts": False,  # upload checkpoints as W&B artifacts
    "wandb_resume": False,  # resume the interrupted W&B run
    "notes": None,  # W&B run notes (arcface_torch's train_v2.py reads cfg.notes)
    # --- set by every arcface_torch job config; defaults are MS1MV3's ---
    "rec": "/train_tmp/ms1m-retinaface-t1",  # folder holding train.rec / train.idx
    "num_classes": 93431,  # identities in the training set
    "num_image": 5179510,  # images in the training set (sets the steps per epoch)
    "num_epoch": 20,  # training epochs
    "warmup_epoch": 0,  # epochs of linear learning-rate warmup
    "val_targets": ["lfw", "cfp_fp", "agedb_30"],  # verification sets <name>.bin in val_dir
    # --- partial_fc extras ---
    "backend": "auto",  # communication backend: auto, horovod, torch or single
    "storage_dtype": "float32",  # dtype the class-center shards are stored in: float32, bfloat16, float16
    "momentum_dtype": "storage",  # the centers' SGD momentum: storage (storage_dtype), int8 (codes + a scale per
    # row: a quarter of float32's bytes) or none (plain SGD for the centers; the backbone keeps `momentum`)
    "amp_dtype": "float16",  # autocast dtype when fp16 is true: float16 or bfloat16
    "channels_last": False,  # NHWC memory layout for the backbone
    "sync_bn": False,  # BatchNorm statistics over every rank's batch (a step then equals one process exactly)
    "clip_grad_norm": 5.0,  # backbone gradient-norm clip (arcface_torch hard-codes 5); 0 disables
    "max_nonfinite_steps": 5,  # stop after this many non-finite losses/gradients in a row
    "max_bad_records": 10,  # records that cannot be used (skipped, slot refilled); one more stops the run
    "stall_timeout": 60.0,  # seconds without a finished step after which the job ends, naming the stalled rank
    "keep_checkpoints": 3,  # checkpoints kept in `output`; older ones are deleted
    "checkpoint_every": 0,  # save every this many steps; 0 = at each epoch end
    "on_save_error": "stop",  # a checkpoint that cannot be written: stop the run, or continue (retry at the next)
    "perf_steps": 0,  # time this many steps and report throughput, then stop; 0 = off
    "profile": False,  # record a torch.profiler trace in `output`
    "lr_power": 1.0,  # power of the polynomial decay after warmup (arcface_torch's PolyScheduler: 1)
    "val_batch_size": 128,  # images per verification forward pass
    "image_size": 112,  # face crop side in pixels; only 112 is supported
    "val_dir": None,  # folder holding <target>.bin; None = rec
    "init_weights": None,  # backbone weights to start from: an arcface_torch backbone.pth or a checkpoint (folder)
    "freeze_backbone_steps": 0,  # fine-tuning: train only the centers for this many first steps (BatchNorm frozen)
    "backbone_lr_mult": 1.0,  # the backbone's learning rate is the schedule's times this (the centers' is not)
    "margin_scale": 64.0,  # logit scale s of the combined margin (arcface_torch fixes 64)
}

SECRET_KEYS = frozenset({"wandb_key"})
OPTIMIZERS = ("sgd", "adamw")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = ("float32", "bfloat16", "float16")  # the names in DTYPES a run may store its centers in
AMP_DTYPES = ("float16", "bfloat16")  # the names in DTYPES autocast may compute in
ON_SAVE_ERROR = ("stop", "continue")

# Old arcface_torch configs name the loss instead of giving margin_list; both used s = 64.
LEGACY_LOSSES = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}

_NULLABLE = frozenset({"output", "suffix_run_name", "notes", "val_dir", "init_weights"})
_SPECIAL_KINDS = {"margin_list": "floats", "val_targets": "strs", "warmup_epoch": "number", "resume": "switch"}
SWITCH_AUTO = "auto"
_KIND_TEXT = {
    "bool": "true or false",
    "switch": f"true, false, {SWITCH_AUTO!r} or a checkpoint folder",
    "int": "an integer",
    "float": "a number",
    "number": "a number",
    "str": "a string",
    "floats": "a sequence of numbers",
    "strs": "a list of strings",
}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _kind(key: str) -> str:
    """The value kind of `key`: bool, int, float, number, str, floats or strs."""
    if key in _SPECIAL_KINDS:
        return _SPECIAL_KINDS[key]
    default = DEFAULTS[key]
    if default is None:
        return "str"
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]


def _describe(key: str) -> str:
    text = _KIND_TEXT[_kind(key)]
    return f"{text} or None" if key in _NULLABLE else text


def _type_error(key: str, value: Any, source: str) -> InputError:
    return InputError(f"{key} = {value!r} (from {source}) must be {_describe(key)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce_value(key: str, value: Any, source: str) -> Any:
    """Return the Python `value` for `key` in its canonical type (int->float, list->tuple...); InputError if wrong."""
    if value is None and key in _NULLABLE:
        return None
    kind = _kind(key)
    if kind in ("bool", "switch") and isinstance(value, bool):
        return value
    if kind == "switch" and isinstance(value, str) and value:  # "auto" or a checkpoint folder
        return value
    if kind == "int" and _is_number(value) and float(value).is_integer():
        return int(value)
    if kind == "float" and _is_number(value):
        return float(value)
    if kind == "number" and _is_number(value):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "floats" and isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    if kind == "strs" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _type_error(key, value, source)


def _literal(key: str, text: str, source: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise InputError(f"{key} = {text!r} (from {source}) is not a valid Python literal") from None


def parse_value(key: str, text: str, source: str) -> Any:
    """Parse the text `text` (environment or --set) into `key`'s type; InputError naming key, text and source."""
    stripped = text.strip()
    if key in _NULLABLE and stripped.lower() in ("none", "null"):
        return None
    kind = _kind(key)
    if kind == "switch" and stripped.lower() == SWITCH_AUTO:
        return SWITCH_AUTO
    if kind == "switch" and stripped and stripped.lower() not in (*_TRUE, *_FALSE):
        return stripped  # a checkpoint folder
    try:
        if kind in ("bool", "switch"):
            if stripped.lower() in _TRUE:
                return True
            if stripped.lower() in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(stripped)
        if kind == "float":
            return float(stripped)
        if kind == "number":
            try:
                return int(stripped)
            except ValueError:
                return float(stripped)
    except ValueError:
        raise _type_error(key, text, source) from None
    if kind in ("floats", "strs"):
        if stripped[:1] in ("(", "["):
            return coerce_value(key, _literal(key, stripped, source), source)
        parts = [part.strip() for part in stripped.split(",") if part.strip()]
        if kind == "strs":
            return parts
        try:
            return tuple(float(part) for part in parts)
        except ValueError:
            raise _type_error(key, text, source) from None
    return stripped


def _unknown_key(key: str, source: str, spell: Callable[[str], str] = repr) -> InputError:
    """InputError for a key not in DEFAULTS, suggesting the nearest valid one (written with `spell`)."""
    close = difflib.get_close_matches(key.lower(), list(DEFAULTS), n=1, cutoff=0.5)
    hint = f"; did you mean {spell(close[0])}?" if close else "; see DEFAULTS in partial_fc/engine/config.py"
    return InputError(f"unknown config key {spell(key)} in {source}{hint}")


def resolve_config_path(source: str | os.PathLike) -> Path:
    """The config file `source` names: an existing path, or a name in the shipped configs/ folder."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".py":
            raise InputError(f"config file {path} is not a Python (.py) file")
        return path
    if path.parent in (Path("."), Path("configs")):
        shipped = CONFIGS_DIR / (path.name if path.suffix == ".py" else path.name + ".py")
        if shipped.is_file():
            return shipped
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.py"))
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; shipped configs: {', '.join(names)}"
    raise MissingInputError(f"config file {source} does not exist and is not a shipped config{hint}")


def _file_error(path: Path, error: Exception) -> InputError:
    """InputError for an exception raised while running config file `path`, with the file's line if known."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(path)]
    where = f" (line {lines[-1]})" if lines else ""
    return InputError(f"config file {path}{where}: {type(error).__name__}: {error}")


def _read_config_file(path: Path) -> dict[str, Any]:
    """Run the config file and return its `config` mapping, legacy `loss` translated to margin_list."""
    try:
        namespace = runpy.run_path(str(path), run_name="__partial_fc_config__")
    except Exception as error:  # a user's file may raise anything; report it as bad input
        raise _file_error(path, error) from error
    values = namespace.get("config")
    if not isinstance(values, dict):
        found = type(values).__name__
        raise InputError(f"config file {path} must define `config` as an EasyDict (config = edict()); found {found}")
    values = dict(values)
    if "loss" in values:
        loss = values.pop("loss")
        if not isinstance(loss, str) or loss not in LEGACY_LOSSES:
            raise InputError(f"loss = {loss!r} (from config file {path}) must be one of {sorted(LEGACY_LOSSES)}")
        margins = LEGACY_LOSSES[loss]
        other = values.get("margin_list", margins)
        if coerce_value("margin_list", other, f"config file {path}") != margins:
            raise InputError(f"config file {path} sets loss = {loss!r} and a different margin_list = {other!r}")
        values["margin_list"] = margins
    return values


def load_config(
    source: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> EasyDict:
    """Build the validated config: DEFAULTS < file `source` < PFC_<KEY> variables in `environ` < `overrides`.

    `source` is a .py path, a shipped config name (`ms1mv3_r50`, `configs/ms1mv3_r50.py`) or None for DEFAULTS.
    `overrides` are "key=value" strings (from --set). `environ` defaults to os.environ.
    """
    values = dict(DEFAULTS)
    sources = dict.fromkeys(DEFAULTS, "defaults")
    name = "base"
    if source is not None:
        path = resolve_config_path(source)
        name = path.stem
        where = f"config file {path}"
        for key, value in _read_config_file(path).items():
            if key not in DEFAULTS:
                raise _unknown_key(key, where)
            values[key] = coerce_value(key, value, where)
            sources[key] = where
    environ = os.environ if environ is None else environ
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        where = f"environment variable {var}"
        if key not in DEFAULTS:
            raise _unknown_key(key, where, spell=lambda k: ENV_PREFIX + k.upper())
        values[key] = parse_value(key, environ[var], where)
        sources[key] = where
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        where = f"--set {item}"
        if not sep or not key:
            raise InputError(f"--set {item!r} is not key=value")
        if key not in DEFAULTS:
            raise _unknown_key(key, where)
        values[key] = parse_value(key, text, where)
        sources[key] = where
    if values["output"] is None:
        values["output"] = os.path.join("work_dirs", name)
    if values["val_dir"] is None:
        values["val_dir"] = values["rec"]
    config = EasyDict()
    for key, value in values.items():
        config[key] = value
    validate(config, sources)
    _warn_unimplemented(config)
    return config


def config_from_dict(data: Mapping[str, Any], source: str = "saved config") -> EasyDict:
    """Rebuild a validated config from `config_to_dict`'s output (e.g. a checkpoint's); missing keys take DEFAULTS."""
    values = dict(DEFAULTS)
    for key, value in data.items():
        if key not in DEFAULTS:
            raise _unknown_key(key, source)
        values[key] = coerce_value(key, value, source)
    config = EasyDict()
    for key, value in values.items():
        config[key] = value
    validate(config, dict.fromkeys(values, source))
    return config


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sample_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "interclass_filtering_threshold": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "warmup_epoch": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
    "max_bad_records": (lambda v: v >= 0, ">= 0 (0: the first bad record stops the run)"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "clip_grad_norm": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 disables)"),
    "stall_timeout": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 disables)"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0 = each epoch end)"),
    "perf_steps": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "freeze_backbone_steps": (lambda v: v >= 0, ">= 0 (0 = the backbone trains from the first step)"),
    "backbone_lr_mult": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "lr_power": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "margin_scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "image_size": (lambda v: v == 112, "112 (the only supported face crop size)"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "backend": (lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
    "storage_dtype": (lambda v: v in STORAGE_DTYPES, f"one of {', '.join(STORAGE_DTYPES)}"),
    "momentum_dtype": (lambda v: v in CENTER_MOMENTUM_CHOICES, f"one of {', '.join(CENTER_MOMENTUM_CHOICES)}"),
    "amp_dtype": (lambda v: v in AMP_DTYPES, f"one of {', '.join(AMP_DTYPES)}"),
    "on_save_error": (lambda v: v in ON_SAVE_ERROR, f"one of {', '.join(ON_SAVE_ERROR)}"),
    "rec": (bool, "a non-empty path"),
    "output": (bool, "a non-empty path"),
    "margin_list": (
        lambda v: len(v) == 3 and all(math.isfinite(m) for m in v) and v[0] > 0,
        "three finite numbers (m1, m2, m3) with m1 > 0",
    ),
}
_POSITIVE_INTS = (
    "batch_size",
    "num_classes",
    "num_image",
    "num_epoch",
    "embedding_size",
    "frequent",
    "verbose",
    "gradient_acc",
    "max_nonfinite_steps",
    "keep_checkpoints",
    "val_batch_size",
)
_RULES.update({key: (lambda v: v > 0, "a positive integer") for key in _POSITIVE_INTS})


def _network_problem(network: str) -> str | None:
    """Why `network` is not a registered backbone, or None (also when the backbones package is not there)."""
    try:
        from partial_fc.backbones import list_models
    except ImportError as error:
        if error.name != "partial_fc.backbones":
            raise
        return None
    names = list(list_models())
    if network in names:
        return None
    close = difflib.get_close_matches(network, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"a registered backbone ({', '.join(names)}){hint}"


def validate(config: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> None:
    """Check every key's type and range; raise one InputError listing each problem with key, value and source.

    `sources` maps keys to where their value came from (load_config passes it); default "config".
    """
    sources = sources or {}
    problems: list[str] = []
    valid: dict[str, Any] = {}
    for key, value in config.items():
        source = sources.get(key, "config")
        if key not in DEFAULTS:
            problems.append(str(_unknown_key(key, source)))
            continue
        try:
            valid[key] = coerce_value(key, value, source)
        except InputError as error:
            problems.append(str(error))
    for key, (check, text) in _RULES.items():
        if valid.get(key) is not None and not check(valid[key]):
            problems.append(f"{key} = {config[key]!r} (from {sources.get(key, 'config')}) must be {text}")
    if "network" in valid:
        why = _network_problem(valid["network"])
        if why:
            problems.append(f"network = {config['network']!r} (from {sources.get('network', 'config')}) must be {why}")
    warmup, epochs = valid.get("warmup_epoch"), valid.get("num_epoch")
    if warmup is not None and epochs is not None and epochs > 0 and warmup >= epochs:
        problems.append(
            f"warmup_epoch = {warmup!r} (from {sources.get('warmup_epoch', 'config')}) must be < num_epoch = {epochs!r}"
        )
    if valid.get("optimizer") == "adamw" and valid.get("momentum_dtype", "storage") != "storage":
        where = sources.get("momentum_dtype", "config")
        problems.append(
            f"momentum_dtype = {config['momentum_dtype']!r} (from {where}) applies to optimizer = 'sgd' "
            "only: AdamW keeps its moments in storage_dtype"
        )
    missing = [key for key in DEFAULTS if key not in config]
    if missing:
        problems.append(f"config lacks keys: {', '.join(missing)}")
    if problems:
        raise InputError("invalid config: " + "; ".join(problems))


def _warn_unimplemented(config: Mapping[str, Any]) -> None:
    """One warning line for accepted arcface_torch settings this trainer does not implement."""
    ignored = [f"{key}=True" for key in ("dali", "dali_aug", "using_wandb") if config.get(key)]
    if ignored:
        logging.getLogger(__name__).warning(
            "config: %s accepted but not implemented (the standard data loader and tensorboard logging are used)",
            ", ".join(ignored),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_to_dict(config: Mapping[str, Any], redact: bool = True) -> dict[str, Any]:
    """A JSON-able copy of `config` for checkpoints and logs (tuples become lists; secrets redacted unless asked)."""
    data = _jsonable(config)
    if redact:
        for key in SECRET_KEYS & data.keys():
            data[key] = "<redacted>"
    return data


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """`key: old -> new` for every key whose JSON value differs between two config dicts."""
    return [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(set(before) | set(after))
        if key not in ignore and before.get(key) != after.get(key)
    ]


def agree_on_config(config: Mapping[str, Any], comm: Communicator) -> None:
    """Raise the same InputError on every rank unless every rank runs the same config (a collective).

    One all-gather of each rank's config digest; only when they differ do the ranks exchange whole configs, so
    that the error can list the keys that differ."""
    data = config_to_dict(config)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=comm.device)
    every = comm.all_gather(mine, sizes=[1] * comm.world_size).tolist()
    if len(set(every)) == 1:
        return
    configs = [comm.broadcast_object(data, root=rank) for rank in range(comm.world_size)]
    differing = [
        f"rank {rank}: " + ", ".join(changed_keys(configs[0], other))
        for rank, other in enumerate(configs)
        if other != configs[0]
    ]
    raise InputError("the ranks were started with different configs (against rank 0's): " + "; ".join(differing))


def format_config(config: Mapping[str, Any]) -> str:
    """A readable key/value listing for the rank-0 log; values that differ from DEFAULTS show the default."""
    data = config_to_dict(config)
    width = max((len(key) for key in data), default=0)
    lines = ["config:"]
    for key, value in data.items():
        default = DEFAULTS.get(key)
        changed = key in DEFAULTS and key not in SECRET_KEYS and value != _jsonable(default)
        note = f"   (default {json.dumps(_jsonable(default))})" if changed else ""
        lines.append(f"  {key:<{width}}  {json.dumps(value)}{note}")
    return "\n".join(lines)
