"""The training loop: backbone replicas with all-reduced gradients, the sharded Partial FC head, one schedule.

Each step: the backbone embeds this rank's batch (under autocast when ``fp16``); the head runs in float32 on a
detached copy of the embeddings, so its own backward updates the sampled centers with the true gradient
(never a loss-scaled one) and hands back the embeddings' gradient; that gradient (scaled for fp16) is then
pushed through the backbone. Steps whose embeddings or loss are not finite are skipped on every rank alike
(both are global facts), counted, and the run stops after ``max_nonfinite_steps`` in a row.

A step on W ranks with batch B moves every parameter as one process with batch W*B would: the head's gradient
convention makes the backbone's averaged gradients the global-batch ones, clipping sees their global norm, the
schedule counts optimizer steps, and flips follow each sample's global position (BatchNorm statistics are per
rank unless ``sync_bn``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from easydict import EasyDict
from torch import nn

from partial_fc.backbones import get_model
from partial_fc.backbones.weights import load_backbone_state, load_weights
from partial_fc.comm import Communicator
from partial_fc.comm.agreement import run_on_root
from partial_fc.comm.timed import TimedCommunicator
from partial_fc.data.datasets import ImageFolderDataset, RandomFaceDataset, RecordFaceDataset
from partial_fc.data.loader import build_loader, device_batch
from partial_fc.data.sampler import DistributedEpochSampler
from partial_fc.engine.checkpoint import (
    CheckpointSaveError,
    TrainingParts,
    backbone_weights_file,
    clean_leftovers,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from partial_fc.engine.config import DTYPES, SWITCH_AUTO, agree_on_config, changed_keys, config_to_dict
from partial_fc.engine.distributed import distribute_backbone
from partial_fc.engine.hooks import Checkpoints, PerfWindow, ProfilerSteps, StepHook, Verification
from partial_fc.engine.monitor import PhaseTimer, TrainMonitor
from partial_fc.engine.preemption import StopSignals, TrainingPreempted
from partial_fc.engine.run_lock import OutputFolderError, RunLock
from partial_fc.engine.schedule import PolyWarmupSchedule
from partial_fc.engine.shared_folder import check_shared_folder
from partial_fc.engine.skipped_records import SkippedRecords
from partial_fc.engine.validation import Verifier, load_verification_sets
from partial_fc.engine.watchdog import StepWatchdog
from partial_fc.errors import InputError, MissingInputError, PartialFCError
from partial_fc.fileio import atomic_path, os_error_cause
from partial_fc.heads import CombinedMargin, NonFiniteEmbeddings, PartialFC, SparseAdamW
from partial_fc.heads.sparse_sgd import center_sgd
from partial_fc.progress import print_line


class TrainingStopped(PartialFCError):
    """Training could not go on (e.g. too many non-finite steps in a row); the message says why."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    epochs: int
    loss: float
    verification: dict[str, float] = field(default_factory=dict)
    best_verification: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    bad_records: int = 0  # distinct records skipped because they could not be used
    checkpoint: str | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None  # the signal that stopped the run early, after a checkpoint


def build_dataset(cfg: EasyDict) -> Any:
    """The training set ``cfg.rec`` names: ``synthetic`` (random in-memory), a RecordIO folder, or an image
    folder; its class count must fit ``cfg.num_classes``."""
    rec = str(cfg.rec)
    if rec == "synthetic":
        return RandomFaceDataset(cfg.num_image, cfg.num_classes, (cfg.image_size, cfg.image_size), seed=cfg.seed)
    root = Path(rec)
    size = (cfg.image_size, cfg.image_size)
    if (root / "train.rec").is_file():
        dataset = RecordFaceDataset(root, image_size=size, flip=True, max_bad_per_batch=cfg.max_bad_records)
        if len(dataset.cut_off) > cfg.max_bad_records:
            raise InputError(
                f"{len(dataset.cut_off)} records of {rec} are cut off by a truncated .rec, more than "
                f"max_bad_records={cfg.max_bad_records} (the first: {dataset.cut_off[0]})"
            )
    elif root.is_dir() and not (root / "train.idx").exists():
        dataset = ImageFolderDataset(root, image_size=size, flip=True, max_bad_per_batch=cfg.max_bad_records)
    else:
        raise MissingInputError(
            f"rec={rec!r}: no {root / 'train.rec'} (with train.idx) and not an image folder; "
            "make one with `partial-fc make-synthetic --out DIR` or `partial-fc im2rec`"
        )
    if dataset.num_classes > cfg.num_classes:
        raise InputError(
            f"num_classes={cfg.num_classes} is smaller than the {dataset.num_classes} classes of "
            f"{rec} (labels up to {dataset.num_classes - 1}): set num_classes >= {dataset.num_classes}"
        )
    return dataset


def build_backbone(cfg: EasyDict, device: torch.device) -> nn.Module:
    """The configured network on ``device``, started from ``cfg.init_weights`` when given."""
    model = get_model(cfg.network, dropout=0.0, fp16=False, num_features=cfg.embedding_size)
    if cfg.init_weights:
        load_weights(model, load_backbone_state(backbone_weights_file(cfg.init_weights)), cfg.init_weights, cfg.network)
    model = model.to(device)
    if _channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def _channels_last(cfg: EasyDict, device: torch.device) -> bool:
    """NHWC only on GPUs: there it feeds tensor cores; CPU convolutions here gain nothing from it."""
    return bool(cfg.channels_last) and device.type == "cuda"


def build_optimizers(
    cfg: EasyDict, backbone: nn.Module, head: PartialFC
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The backbone's torch optimizer and the head's sparse one, both of ``cfg.optimizer``'s kind."""
    in_backward = cfg.gradient_acc == 1
    if cfg.optimizer == "sgd":
        body = torch.optim.SGD(backbone.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        centers = center_sgd(head, cfg.lr, cfg.momentum, cfg.weight_decay, in_backward, cfg.momentum_dtype)
    else:
        body = torch.optim.AdamW(backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        centers = SparseAdamW(head, lr=cfg.lr, weight_decay=cfg.weight_decay, update_in_backward=in_backward)
    return body, centers


def seed_everything(seed: int) -> None:
    """Same seed on every rank: the backbone is broadcast from rank 0 anyway; sampling seeds itself per rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_config(path: Path, cfg: EasyDict) -> None:
    """``config.json``: the run's config, replaced atomically; OutputFolderError naming the file when it cannot be."""
    try:
        with atomic_path(path) as temporary:
            Path(temporary).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise OutputFolderError(f"cannot write {path}: {os_error_cause(error)}") from error


class Trainer:
    """One run: builds the parts from a validated config, then `fit()` trains (and evaluates, checkpoints)."""

    def __init__(self, cfg: EasyDict, comm: Communicator):
        agree_on_config(cfg, comm)
        check_shared_folder(Path(cfg.output), comm)
        self.cfg, self.device = cfg, comm.device
        self.output = Path(cfg.output)
        self.perf_steps = int(cfg.perf_steps)
        self.timer = PhaseTimer(self.perf_steps > 0, self.device)
        self.comm = TimedCommunicator(comm, lambda: self.timer.phase("communication")) if self.perf_steps else comm
        seed_everything(cfg.seed)
        self.dataset = build_dataset(cfg)
        self.verifier = Verifier(
            load_verification_sets(list(cfg.val_targets), cfg.val_dir, cfg.image_size),
            comm,
            cfg.embedding_size,
            cfg.val_batch_size,
        )
        self.sampler = DistributedEpochSampler(len(self.dataset), comm.rank, comm.world_size, seed=cfg.seed)
        self.micro_steps_per_epoch = self.sampler.num_samples // cfg.batch_size
        if self.micro_steps_per_epoch < cfg.gradient_acc:
            raise InputError(
                f"batch_size={cfg.batch_size} x {comm.world_size} ranks x gradient_acc="
                f"{cfg.gradient_acc} needs more than the {len(self.dataset)} images of {cfg.rec}"
            )
        self.steps_per_epoch = self.micro_steps_per_epoch // cfg.gradient_acc
        self.total_steps = self.steps_per_epoch * cfg.num_epoch
        self.raw_backbone = build_backbone(cfg, self.device)
        margin = CombinedMargin(s=cfg.margin_scale, m1=cfg.margin_list[0], m2=cfg.margin_list[1], m3=cfg.margin_list[2])
        self.head = PartialFC(
            margin,
            cfg.embedding_size,
            cfg.num_classes,
            cfg.sample_rate,
            cfg.fp16 and self.device.type == "cuda",
            comm=self.comm,
            storage_dtype=DTYPES[cfg.storage_dtype],
            seed=cfg.seed,
            interclass_filtering_threshold=cfg.interclass_filtering_threshold,
            initialise=not cfg.resume,
        )  # a resume fills the shard: not written twice
        self.centers_pending = bool(cfg.resume)  # until resume() loads them, or finds none and initialises
        body_optimizer, self.head_optimizer = build_optimizers(cfg, self.raw_backbone, self.head)
        self.replicas = distribute_backbone(
            self.raw_backbone, body_optimizer, comm, accumulation_steps=cfg.gradient_acc, sync_batchnorm=cfg.sync_bn
        )
        self.backbone_optimizer = self.replicas.optimizer
        warmup = min(int(self.steps_per_epoch * cfg.warmup_epoch), self.total_steps - 1)
        self.schedule = PolyWarmupSchedule(
            [self.backbone_optimizer, self.head_optimizer],
            cfg.lr,
            self.total_steps,
            warmup,
            cfg.lr_power,
            lr_mults=[cfg.backbone_lr_mult, 1.0],
        )
        self.amp_dtype = DTYPES[cfg.amp_dtype] if cfg.fp16 else None
        use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        # On a CPU the centers and their optimizer state live in this process's memory: forked workers would
        # keep their copy-on-write image alive, and every row the optimizer writes would then be duplicated
        # (10M classes on 2 ranks of a 24 GiB machine: killed for memory by the second step).
        start_method = "forkserver" if self.device.type == "cpu" else None
        self.loader = build_loader(
            self.dataset,
            cfg.batch_size,
            self.sampler,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            start_method=start_method,
        )
        self.step, self.skipped, self.nonfinite_in_a_row = 0, 0, 0
        self.run_lock: RunLock | None = None
        claimed = run_on_root(comm, self._claim_output)
        self.monitor = TrainMonitor(
            comm.rank, comm.world_size, self.total_steps, cfg.frequent, self.output, resuming=bool(cfg.resume)
        )
        for line in claimed:
            self.monitor.print(line)
        self.skipped_records = SkippedRecords(self.comm, cfg.max_bad_records, str(cfg.rec), self.monitor.print)
        self.stop_signals = StopSignals(comm.rank)
        self.watchdog = StepWatchdog(
            comm.rank, comm.world_size, self.output / "heartbeat", cfg.stall_timeout, locate=lambda: self.timer.current
        )

    # ------------------------------------------------------------------------------------------------ state
    @property
    def checkpoint_root(self) -> Path:
        return self.output / "checkpoints"

    @property
    def parts(self) -> TrainingParts:
        """What a checkpoint saves of this run and restores into it."""
        return TrainingParts(
            self.raw_backbone,
            self.backbone_optimizer,
            self.head,
            self.head_optimizer,
            self.schedule,
            self.sampler,
            self.scaler,
        )

    def _claim_output(self) -> list[str]:
        """Rank 0: lock the output folder for this run, tidy a dead run's leftover saves, and write config.json,
        which so describes the run that owns the checkpoints; returns the lines to report."""
        self.run_lock = RunLock.acquire(self.output)
        try:
            tidied = clean_leftovers(self.checkpoint_root)
            _write_config(self.output / "config.json", self.cfg)
        except BaseException:
            self.run_lock.release()
            self.run_lock = None
            raise
        self.run_lock.start_heartbeat()
        gone = self.run_lock.took_over
        return ([f"took over {self.output} from a run that is gone ({gone.describe()})"] if gone else []) + tidied

    def close(self) -> None:
        """Close the run's files and free the output folder for the next run; safe to call more than once."""
        self.monitor.close()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _resume_source(self) -> Path | None:
        """The checkpoint folder (or root of them) ``resume`` names: ``output/checkpoints`` for true and auto, else
        the given path; None when auto finds none. Backbone weights alone are refused, pointing at init_weights."""
        resume = self.cfg.resume
        source = self.checkpoint_root if resume is True or resume == SWITCH_AUTO else Path(resume)

        def weights_hint(weights: Path) -> str:
            return (
                f"backbone weights alone cannot continue a run; to start a new run (fresh centers, any "
                f"num_classes) from them set init_weights={weights} and leave resume off"
            )

        if source.is_file():
            raise InputError(f"resume={source} is a file, not a checkpoint folder: {weights_hint(source)}")
        if find_latest(source) is not None:
            return source
        if resume == SWITCH_AUTO:
            return None
        weights = sorted(source.glob("*.pth")) if source.is_dir() else []
        if weights:
            raise InputError(
                f"resume={resume}: {source} holds no partial_fc checkpoint but {weights[0].name}: "
                f"{weights_hint(weights[0])}"
            )
        raise MissingInputError(f"resume={resume} but {source} holds no complete checkpoint")

    def _initialise_pending_centers(self) -> None:
        """Initialise the centers when a ``resume`` config did not load them (none found, or resume() not called)."""
        if self.centers_pending:
            self.head.reset_centers()
            self.centers_pending = False

    def resume(self) -> None:
        """Continue from the newest valid checkpoint in ``output/checkpoints`` or the folder ``resume`` names (on
        any number of ranks; a corrupt newer one is reported and passed over); with ``resume="auto"`` start
        afresh when there is none yet (a restart after an early failure)."""
        source = run_on_root(self.comm, self._resume_source)
        if source is None:
            self._initialise_pending_centers()
            self.monitor.print(f"resume=auto: no checkpoint in {self.checkpoint_root} yet, starting at step 0")
            return
        state = load_checkpoint(source, self.parts, comm=self.comm)
        self.centers_pending = False
        if state.step >= self.total_steps:
            raise InputError(
                f"{state.path} is at step {state.step}, and this plan ends at step {self.total_steps} "
                f"(num_epoch={self.cfg.num_epoch}): nothing is left to train; raise num_epoch to go on"
            )
        self.step = state.step
        for reason in state.skipped:
            self.monitor.print(f"warning: passed over a corrupt checkpoint: {reason}")
        self.monitor.print(
            f"resumed from {state.path}{' (the newest valid checkpoint)' if state.skipped else ''} "
            f"at step {state.step}, epoch {state.epoch}"
            + (f" (saved on {state.saved_world_size} ranks, re-sharded)" if state.resharded else "")
            + "".join(f"; {note}" for note in state.notes)
        )
        changes = changed_keys(state.config, config_to_dict(self.cfg), ignore=("resume",))
        if changes:
            self.monitor.print(
                f"config changed since the checkpoint: {'; '.join(changes)}; the learning rate of "
                f"step {state.step + 1} is now {self.schedule.lr_at(state.step):.6g}"
            )

    def save(self, final: bool = False) -> Path | None:
        """A checkpoint of everything needed to continue exactly (a collective). When it cannot be written every
        rank stops with the error (``on_save_error=stop``, and always for the ``final`` one), or warns and returns
        None, to try again at the next checkpoint (``continue``)."""
        with self.watchdog.slow("checkpoint"):
            try:
                return save_checkpoint(
                    self.checkpoint_root,
                    self.parts,
                    comm=self.comm,
                    step=self.step,
                    epoch=self.sampler.epoch,
                    config=config_to_dict(self.cfg),
                    keep=self.cfg.keep_checkpoints,
                )
            except CheckpointSaveError as error:  # raised alike on every rank, so every rank decides alike
                if self.cfg.on_save_error == "stop" or final:
                    why = "on_save_error=stop" if self.cfg.on_save_error == "stop" else "the run's last checkpoint"
                    raise TrainingStopped(
                        f"{error}; stopped after step {self.step} ({why}): make room or fix the "
                        "folder, then continue with --resume"
                    ) from error
                print_line(
                    f"partial-fc: warning: rank {self.comm.rank}: {error}; training goes on "
                    "(on_save_error=continue) and the next checkpoint tries again"
                )
                return None

    # ------------------------------------------------------------------------------------------------- step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _skip(self, why: str) -> None:
        """Count a skipped step; stop after too many in a row."""
        self.skipped += 1
        self.nonfinite_in_a_row += 1
        self.backbone_optimizer.zero_grad()
        self.head.take_sampled()
        self.monitor.print(f"step {self.step + 1}: skipped ({why}); {self.nonfinite_in_a_row} in a row")
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise TrainingStopped(
                f"stopped at step {self.step + 1}: {self.nonfinite_in_a_row} steps in a row had "
                f"{why} (max_nonfinite_steps={self.cfg.max_nonfinite_steps}); lower lr, "
                "use amp_dtype=bfloat16, or check the data"
            )

    @property
    def backbone_frozen(self) -> bool:
        """Whether the next step trains only the centers (``freeze_backbone_steps``, counted in optimizer steps)."""
        return self.step < self.cfg.freeze_backbone_steps

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings: with autograd through the (distributed) backbone, or while it is frozen
        (in eval mode then, set by `_begin`) without autograd and outside the data-parallel wrapper."""
        frozen = self.backbone_frozen
        with self.timer.phase("backbone"), self._autocast(), torch.set_grad_enabled(not frozen):
            return (self.raw_backbone if frozen else self.replicas.module)(images)

    def _micro_step(self, batch: Any, last: bool) -> float | None:
        """Forward and backward of one batch; None when the step must be skipped."""
        with self.timer.phase("data"):
            images, labels = device_batch(batch, self.device)
        layout = torch.channels_last if _channels_last(self.cfg, self.device) else torch.contiguous_format
        images = images.contiguous(memory_format=layout)
        with self.replicas.micro_step(last):
            embeddings = self._embed(images)
            features = embeddings.detach().float().requires_grad_(not self.backbone_frozen)
            with self.timer.phase("head"):
                try:
                    loss = self.head(features, labels)
                except NonFiniteEmbeddings:  # found in the head's first collective, so every rank skips alike
                    return None
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    return None
                (loss / self.cfg.gradient_acc).backward()
            if self.backbone_frozen:
                return loss_value
            with self.timer.phase("backbone"):
                grad = features.grad.to(embeddings.dtype)
                embeddings.backward(self.scaler.scale(grad) if self.scaler is not None else grad)
        return loss_value

    def _optimizer_step(self) -> float | None:
        """Clip and step the backbone, step the centers; returns the norm of the backbone's global-batch gradient
        before clipping (the same on every rank: gradients are averaged first), None when it is not finite; only
        the centers while the backbone is frozen (its norm is then 0)."""
        if self.backbone_frozen:
            with self.timer.phase("optimizer"):
                self.head_optimizer.step()
            return 0.0
        with self.timer.phase("communication"):
            self.replicas.wait_for_gradients()
        with self.timer.phase("optimizer"):
            if self.scaler is not None:
                self.scaler.unscale_(self.backbone_optimizer)
            params = [p for p in self.raw_backbone.parameters() if p.grad is not None]
            clip = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else math.inf
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            finite = math.isfinite(norm)
            with self.replicas.stepping():
                if self.scaler is not None:
                    self.scaler.step(self.backbone_optimizer)
                    self.scaler.update()
                elif finite:
                    self.backbone_optimizer.step()
            self.head_optimizer.step()
            self.backbone_optimizer.zero_grad()
        if not finite and self.scaler is None:
            return None
        return norm  # under a loss scaler an overflow is the scaler's to handle (that step is skipped by it)

    # -------------------------------------------------------------------------------------------------- fit
    def _evaluate(self) -> dict[str, float]:
        with self.watchdog.slow("evaluation"):
            results = self.verifier(self.raw_backbone)
        for name, result in results.items():
            self.monitor.print(f"step {self.step} | {name}: {result.summary()} | best {self.verifier.best[name]:.5f}")
            self.monitor.scalars(self.step, **{f"verification/{name}": result.accuracy})
        return {name: result.accuracy for name, result in results.items()}

    def fit(self) -> TrainResult:
        """Train to the end of ``num_epoch`` (or ``perf_steps``), evaluating every ``verbose`` steps.

        SIGTERM or SIGINT on any rank stops every rank after the same step, with a checkpoint, and raises
        ``TrainingPreempted``."""
        self._initialise_pending_centers()
        self.stop_signals.install()
        self.watchdog.start()
        try:
            result = self._fit()
        finally:
            self.watchdog.stop()
            self.stop_signals.uninstall()
            self.close()
        if result.stopped_by and self.step < self.total_steps:
            where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
            self.monitor.print(
                f"stopped by {result.stopped_by} after step {self.step} of {self.total_steps}{where}; "
                "continue with the same command and --resume (RESUME=1 for run.sh and config.sh)"
            )
            raise TrainingPreempted(f"stopped by {result.stopped_by} after step {self.step}")
        return result

    def _begin(self) -> None:
        """Report the plan; a frozen backbone goes into eval mode, so BatchNorm uses and keeps its loaded statistics."""
        cfg = self.cfg
        self.monitor.print(
            f"training {cfg.network} on {len(self.dataset)} images, {cfg.num_classes} classes, "
            f"{self.comm.world_size} ranks x batch {cfg.batch_size}: {self.total_steps} steps "
            f"({self.steps_per_epoch} per epoch)"
        )
        if cfg.rec != "synthetic" and cfg.num_image != len(self.dataset):
            self.monitor.print(
                f"note: num_image={cfg.num_image} in the config, but {cfg.rec} holds "
                f"{len(self.dataset)} images; steps follow the data set"
            )
        if self.backbone_frozen:
            self.raw_backbone.eval()
            self.monitor.print(
                f"backbone frozen until step {cfg.freeze_backbone_steps}: only the centers train, "
                "BatchNorm statistics stay as loaded"
            )

    def _fit(self) -> TrainResult:
        """Epochs up to the plan's last step (perf mode: the perf window's), the hooks after each step and epoch."""
        cfg = self.cfg
        self._begin()
        result = TrainResult(steps=0, epochs=0, loss=math.nan)
        samples_per_step = cfg.batch_size * cfg.gradient_acc * self.comm.world_size
        hooks: list[StepHook]
        if self.perf_steps:
            perf = PerfWindow(
                self.step, self.perf_steps, self.timer, samples_per_step, self.comm.world_size, self.monitor.print
            )
            hooks, last_step = [perf], min(perf.end, self.total_steps)
        else:
            hooks = [
                Verification(cfg.verbose, self.total_steps, self._evaluate),
                Checkpoints(cfg.checkpoint_every, self.save),
            ]
            last_step = self.total_steps
        with contextlib.ExitStack() as stack:
            if cfg.profile:
                hooks.insert(0, ProfilerSteps(stack.enter_context(self._profiler())))
            start = time.perf_counter()
            while self.step < last_step and not result.stopped_by:
                self._epoch(result, last_step, hooks)
        result.seconds = time.perf_counter() - start
        result.samples_per_second = self.step * samples_per_step / max(result.seconds, 1e-9)
        for hook in hooks:
            hook.after_training(self.step, result)
        self.monitor.close()
        result.steps, result.epochs, result.skipped_steps = self.step, self.step // self.steps_per_epoch, self.skipped
        result.bad_records = len(self.skipped_records)
        result.best_verification = dict(self.verifier.best)
        return result

    def _epoch(self, result: TrainResult, last_step: int, hooks: list[StepHook]) -> None:
        """The rest of the sampler's epoch, up to `last_step` or a stop signal, with `hooks` after each step and at
        the epoch's end."""
        cfg = self.cfg
        for loss, grad_norm in self._steps():
            result.loss = loss
            self.monitor.step(
                self.step,
                self.sampler.epoch,
                loss,
                self.schedule.lr_at(self.step - 1),
                cfg.batch_size * cfg.gradient_acc,
                grad_norm,
                None if self.scaler is None else float(self.scaler.get_scale()),
            )
            result.stopped_by = self.stop_signals.agreed(self.comm)
            if result.stopped_by:
                return
            for hook in hooks:
                hook.after_step(self.step, result)
            if self.step >= last_step:
                return
        for hook in hooks:
            hook.after_epoch(self.step, result)

    def _steps(self) -> Iterator[tuple[float, float]]:
        """The optimizer steps of the rest of the sampler's epoch, one per `gradient_acc` batches: (mean loss,
        gradient norm) of each one taken; one with non-finite values is skipped (`_skip`) and not yielded."""
        accumulation = self.cfg.gradient_acc
        batches = iter(self.loader)
        micro, loss_sum = 0, 0.0
        while True:
            with self.timer.phase("data"):
                batch = next(batches, None)
            if batch is None:
                return
            self.skipped_records.agree(getattr(batch, "bad_records", ()), self.step + 1)  # before any rank trains
            micro += 1
            last = micro % accumulation == 0
            loss = self._micro_step(batch, last)
            if loss is None:
                self._skip("a non-finite loss or embeddings")
                micro, loss_sum = 0, 0.0
                continue
            loss_sum += loss
            if not last:
                continue
            grad_norm = self._optimizer_step()
            if grad_norm is None:
                self._skip("non-finite backbone gradients")
                loss_sum = 0.0
                continue
            self._advance()
            yield loss_sum / accumulation, grad_norm
            loss_sum = 0.0

    def _advance(self) -> None:
        """Count a step taken: unfreeze the backbone when its time comes, move the watchdog and the schedule on."""
        cfg = self.cfg
        self.nonfinite_in_a_row = 0
        self.step += 1
        if self.step == cfg.freeze_backbone_steps and self.step < self.total_steps:
            self.raw_backbone.train()
            self.monitor.print(
                f"step {self.step}: backbone unfrozen, learning rate x{cfg.backbone_lr_mult:g} of the centers'"
            )
        self.watchdog.progress(self.step)
        self.schedule.step()

    def _profiler(self) -> torch.profiler.profile:
        """A torch.profiler over a few steps writing a Chrome trace per rank to ``output/profile``."""
        folder = self.output / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        rank = self.comm.rank

        def write(prof: torch.profiler.profile) -> None:
            prof.export_chrome_trace(str(folder / f"trace_rank{rank}.json"))

        return torch.profiler.profile(
            activities=activities,
            on_trace_ready=write,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        )
