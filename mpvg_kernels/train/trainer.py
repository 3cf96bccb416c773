"""The trainer behind ``mpvg train``.

AdamW with the models' weight-decay exclusions (``param_groups``), warmup + cosine learning rate per step, AMP
(bf16/fp16 autocast; fp16 with a gradient scaler), optional ``torch.compile``, EMA of the weights, gradient
clipping, a tqdm progress bar, ``metrics.jsonl`` + ``curves.png``, a checkpoint after every epoch with exact
resume, and DistributedDataParallel under ``torchrun`` (only rank 0 writes files).

Output directory::

    checkpoint.pt   latest epoch (model, optimizer, scheduler, scaler, EMA, RNG of every rank, config)
    metrics.jsonl   one JSON record per epoch
    curves.png      loss / accuracy / learning rate per epoch
    summary.json    final accuracy, throughput, model and run facts
    config.yaml     the resolved configuration

Exact resume: the data order is a function of ``(seed, epoch)`` and every RNG (torch, CUDA, numpy, python) of
every rank is saved at the end of each epoch, so a run stopped after epoch k and resumed with ``--resume`` ends
with weights bitwise equal to an uninterrupted run (same machine, same world size, same settings).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from .. import data as data_mod
from ..data import EvalTransform
from ..errors import UserError
from ..models import count_parameters, param_groups
from . import distributed as D
from . import run_dir
from .augment import TrainTransform, classification_loss
from .checkpoint import (
    CHECKPOINT_NAME,
    build_model,
    capture_rng,
    load_checkpoint,
    load_state_dict_checked,
    restore_rng,
    save_checkpoint,
    seed_all,
    weights_digest,
)
from .config import TrainConfig, config_to_dict, validate
from .ema import ModelEma
from .evaluate import AMP_DTYPES, evaluate
from .metrics import JsonlLog, plot_curves
from .schedule import WarmupCosine

#: Config keys that may differ between a checkpoint and the run that resumes it (they do not change the math).
RESUME_FREE_KEYS = frozenset({"num_workers", "device", "compile", "threads"})
#: Error texts of a collective whose peer process is gone (gloo, NCCL).
_PEER_FAILURE_HINTS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                       "remote process exited", "ProcessGroupGloo")


def _rank_seed(seed: int, rank: int) -> int:
    """Seed of the augmentation/dropout RNG of ``rank`` (distinct per rank, distinct from the init seed)."""
    return seed + 100_003 * (rank + 1)


def model_input_spec(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """in_chans, input size, mean, std and crop_pct from the model's ``default_cfg``, overridden by ``cfg``."""
    dcfg = dict(getattr(model, "default_cfg", {}) or {})
    if "input_size" not in dcfg:
        raise UserError(f"model {cfg.model} has no default_cfg['input_size']")
    c, h, w = (int(v) for v in dcfg["input_size"])
    mean = cfg.mean if cfg.mean is not None else dcfg.get("mean", (0.5,) * c)
    std = cfg.std if cfg.std is not None else dcfg.get("std", (0.5,) * c)
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else float(dcfg.get("crop_pct", 0.875))
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise UserError(f"{name} {list(v)} has {len(v)} values; the model {cfg.model} has {c} input channels")
    return {"in_chans": c, "input_size": [h, w], "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "crop_pct": crop_pct}


def _show_progress(flag: bool | None, info: D.DistInfo) -> bool:
    if not info.is_main:
        return False
    if flag is None:
        return sys.stderr.isatty()
    return flag


def _check_resume_config(ckpt_cfg: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = config_to_dict(cfg)
    diffs = [f"{k}: checkpoint {ckpt_cfg.get(k)!r} vs now {now[k]!r}"
             for k in now if k not in RESUME_FREE_KEYS and ckpt_cfg.get(k) != now[k]]
    if diffs:
        raise UserError(f"cannot resume {path}: the settings differ from the run that wrote it ("
                        + "; ".join(diffs[:6]) + "). Resume with the same recipe and flags.")


def _is_finished(ckpt_path: Path) -> bool | None:
    """Whether the checkpoint at ``ckpt_path`` finished its schedule (None: no readable checkpoint)."""
    if not ckpt_path.exists():
        return None
    try:
        old = load_checkpoint(ckpt_path)
        return int(old["epoch"]) >= int(old["config"]["epochs"])
    except (UserError, KeyError, TypeError, ValueError):
        return None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training; says which epoch the checkpoint holds (``saved_epoch``, 0: none)."""

    def __init__(self, saved_epoch: int, epochs: int, checkpoint: Path) -> None:
        self.saved_epoch, self.epochs, self.checkpoint = saved_epoch, epochs, checkpoint
        super().__init__(f"epoch {saved_epoch}/{epochs} is saved in {checkpoint}" if saved_epoch
                         else "no epoch was saved")


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool | str | os.PathLike = False,
          stop_after_epoch: int | None = None, progress: bool | None = None, overwrite: bool = False,
          verbose: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into the directory ``out`` and return the summary (also written to ``out/summary.json``).

    ``resume``: True (``out/checkpoint.pt``) or a checkpoint path. ``stop_after_epoch``: end this invocation
    after that epoch (the schedule still spans ``cfg.epochs``), as a preemption would. ``progress``: tqdm bar
    (None: when stderr is a terminal). Under ``torchrun`` this sets up the process group and DDP. The number of
    intra-op threads (``cfg.threads``) is restored when training ends.

    Every setting is checked before anything in ``out`` changes: the config ranges, ``out`` itself, the
    checkpoint to resume, the model (built, and one forward and backward pass on a small batch), the data and the
    augmentation. ``dry_run``: stop after these checks and write nothing (returns ``{"dry_run": True, ...}``).
    A failing write (full disk) is a :class:`UserError` naming the last intact checkpoint; Ctrl-C raises
    :class:`TrainingInterrupted`.
    """
    validate(cfg)
    threads_before = torch.get_num_threads()
    info = D.setup(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _Trainer(cfg, Path(out), info, verbose=verbose).run(
            resume=resume, stop_after_epoch=stop_after_epoch, progress=progress, overwrite=overwrite,
            dry_run=dry_run)
    finally:
        D.cleanup(info)
        torch.set_num_threads(threads_before)


@dataclass
class _Data:
    """The data side of a run: the data set, the model's input spec and the loaders."""

    spec: data_mod.DataSpec
    classes: list[str]
    inp: dict[str, Any]  # model_input_spec
    splits: data_mod.DataSplits
    sampler: D.ShardedSampler
    train_loader: DataLoader
    eval_loader: DataLoader
    train_tf: TrainTransform
    eval_tf: EvalTransform


@dataclass
class _Optimization:
    """Optimizer, per-step learning-rate schedule, gradient scaler, EMA and autocast dtype of a run."""

    optimizer: torch.optim.Optimizer
    sched: WarmupCosine
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    amp_dtype: torch.dtype | None
    peak_lr: float
    global_batch: int


@dataclass
class _Progress:
    """What the epoch loop did in this invocation."""

    last: dict[str, Any]  # the last epoch's record
    completed: int  # epochs completed, counting those before a resume
    train_images: int = 0
    train_time: float = 0.0  # without the torch.compile warm-up
    compile_time: float = 0.0


class _Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, info: D.DistInfo, verbose: bool = True) -> None:
        self.cfg, self.out, self.info, self.verbose = cfg, out, info, verbose

    def log(self, msg: str) -> None:
        if self.info.is_main and self.verbose:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------------------------
    def run(self, resume: bool | str | os.PathLike, stop_after_epoch: int | None, progress: bool | None,
            overwrite: bool, dry_run: bool = False) -> dict[str, Any]:
        t_start = time.perf_counter()
        self._saved_epoch = 0
        created = self._claim_out_dir()
        try:
            ckpt, resume_path = self._open_run(resume, overwrite)
            model, data = self._setup_model_and_data()
            opt = self._build_optimization(model, len(data.train_loader))
        except BaseException:
            # nothing was trained: leave no empty folder behind (and never touch an existing run's files)
            self._release_unused(created)
            raise
        if dry_run:
            self._release_unused(created)
            self.log(f"dry run: every setting checked ({self.cfg.model} pe={self.cfg.pe} built and run on one "
                     f"batch, {len(data.splits.train)} training images of {data.spec}, {self.out} usable); "
                     "nothing was written")
            return {"dry_run": True, "out": str(self.out), "resume": ckpt is not None}
        try:
            with self._disk_errors_named(), self._interrupt_names_the_saved_epoch():
                if ckpt is None and overwrite and self.info.is_main:
                    removed = run_dir.clear_run_files(self.out)
                    if removed:
                        self.log(f"note: --overwrite: removed the previous run's {', '.join(removed)} from "
                                 f"{self.out}")
                log = JsonlLog(self.out / "metrics.jsonl")
                start_epoch = self._restore(ckpt, resume_path, model, opt, log)
                self._saved_epoch = start_epoch
                del ckpt
                with self._stop_cleanly_if_a_peer_fails():
                    done = self._epoch_loop(model, data, opt, log, start_epoch, stop_after_epoch, progress)
                    return self._finish(model, data, opt, log, done, t_start)
        finally:
            self._lock.release()

    def _release_unused(self, created: bool) -> None:
        """Drop the lock of a run that wrote nothing, and the folder when this run created it and it is empty."""
        self._lock.release(remove=created)
        if created and self.info.is_main and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _saved_note(self) -> str:
        """Where the last intact checkpoint is, for a message about a run that stopped."""
        if self._saved_epoch:
            return (f"the checkpoint of epoch {self._saved_epoch} in {self.out / CHECKPOINT_NAME} is intact: "
                    "continue with --resume")
        return "no checkpoint was written yet"

    def _peer_failed_message(self, why: str) -> str:
        return f"rank {self.info.rank} stopped: {why}; {self._saved_note()}"

    @contextlib.contextmanager
    def _disk_errors_named(self) -> Iterator[None]:
        """An ``OSError`` while the run writes (a full disk, a folder gone read-only) becomes one line naming the
        problem and the last intact checkpoint; a half-written temporary checkpoint is removed."""
        try:
            yield
        except OSError as e:
            if self.info.is_main:
                with contextlib.suppress(OSError):
                    (self.out / (CHECKPOINT_NAME + ".tmp")).unlink(missing_ok=True)
            where = f" ({e.filename})" if e.filename else ""
            raise UserError(f"cannot write the run's files: {e.strerror or e}{where}; {self._saved_note()}") from None

    @contextlib.contextmanager
    def _interrupt_names_the_saved_epoch(self) -> Iterator[None]:
        """Ctrl-C becomes :class:`TrainingInterrupted`, which says which epoch the checkpoint holds."""
        try:
            yield
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._saved_epoch, self.cfg.epochs, self.out / CHECKPOINT_NAME) from None

    @contextlib.contextmanager
    def _stop_cleanly_if_a_peer_fails(self) -> Iterator[None]:
        """Under torchrun, turn the end of the job after another rank failed (the launcher's SIGTERM, or a
        collective whose peer vanished) into one line that says where the last good checkpoint is."""
        if not self.info.distributed:
            yield
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            raise UserError(self._peer_failed_message("the launcher ended the job (another process failed)"))

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield
        except RuntimeError as e:  # DistError subclasses it; gloo reports a vanished peer as a plain RuntimeError
            msg = str(e)
            if not (isinstance(e, torch.distributed.DistError) or any(k in msg for k in _PEER_FAILURE_HINTS)):
                raise
            raise UserError(self._peer_failed_message(f"a collective failed ({msg.splitlines()[0][:160]})")) from e
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _claim_out_dir(self) -> bool:
        """Rank 0: check ``--out``, create it and take the run lock. Returns whether the folder was created."""
        self._lock = run_dir.RunLock(self.out)
        if not self.info.is_main:
            return False
        run_dir.check_out_dir(self.out)
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except BaseException as e:
            if created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            if isinstance(e, OSError):
                raise UserError(f"--out {self.out} cannot hold a run: {e.strerror or e}"
                                + (f" ({e.filename})" if e.filename and str(e.filename) != str(self.out) else "")
                                ) from None
            raise
        return created

    def _open_run(self, resume: bool | str | os.PathLike, overwrite: bool) -> tuple[dict[str, Any] | None,
                                                                                   Path | None]:
        """Refuse to start over an existing run (unless ``overwrite``), or load the checkpoint to resume from,
        checked against this run's settings and world size; a finished run has nothing to resume."""
        cfg, info, out = self.cfg, self.info, self.out
        if not resume:
            if info.is_main and not overwrite and run_dir.existing_run_files(out):
                run_dir.refuse_existing_run(out, _is_finished(out / CHECKPOINT_NAME))
            return None, None
        resume_path = out / CHECKPOINT_NAME if resume is True else Path(resume)
        ckpt = load_checkpoint(resume_path)
        missing = [k for k in ("optimizer", "scheduler", "rng") if k not in ckpt]
        if missing:
            raise UserError(
                f"cannot resume from {resume_path}: it holds weights and their metadata only (no {', '.join(missing)} "
                f"state, e.g. a .safetensors export); resume from the run's {CHECKPOINT_NAME}, or start a new run "
                f"from these weights with --set model_kwargs.checkpoint_path={resume_path}"
            )
        _check_resume_config(ckpt["config"], cfg, resume_path)
        if int(ckpt["epoch"]) >= cfg.epochs:
            raise UserError(f"nothing to resume: {resume_path} is a finished run ({int(ckpt['epoch'])}/{cfg.epochs} "
                            "epochs); its files are left as they are (train longer with a new run and --epochs)")
        if int(ckpt.get("world_size", 1)) != info.world_size:
            raise UserError(f"cannot resume {resume_path}: written with world size {ckpt.get('world_size')}, "
                            f"now {info.world_size}; the global batch and schedule would change")
        return ckpt, resume_path

    def _setup_model_and_data(self) -> tuple[nn.Module, _Data]:
        """Build the model (same init on every rank: seeded with ``cfg.seed``), load the data in the model's input
        format, build the sharded loaders and the transforms, and run one small batch through them and the model
        (:meth:`_probe`), so that a setting that would fail at the first step fails here, before any file changes."""
        cfg, info = self.cfg, self.info
        device = info.device
        seed_all(cfg.seed)
        spec = data_mod.parse_data_spec(cfg.data)
        classes = data_mod.class_names(spec)
        model = build_model(cfg.model, cfg.pe, len(classes), cfg.model_kwargs)
        inp = model_input_spec(model, cfg)
        splits = data_mod.load_data(spec, inp["in_chans"], inp["input_size"], inp["crop_pct"])
        for note in splits.notes:
            self.log(f"note: {note}")
        model.to(device)

        workers = cfg.num_workers
        if workers is None:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)))
            workers = 0 if splits.in_memory else min(8, max(1, D.usable_cpus() // local_world))
        pin = device.type == "cuda"
        sampler = D.ShardedSampler(len(splits.train), info.world_size, info.rank, cfg.seed, True, cfg.repeated_aug)
        train_loader = DataLoader(splits.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                  num_workers=workers, pin_memory=pin, persistent_workers=False)
        eval_loader = DataLoader(splits.test, batch_size=max(cfg.batch_size, 128),
                                 sampler=D.EvalShardSampler(len(splits.test), info.world_size, info.rank),
                                 num_workers=workers, pin_memory=pin)
        if len(train_loader) == 0:
            raise UserError(f"the training set has {len(sampler)} images per process, fewer than the batch size "
                            f"{cfg.batch_size}; lower --batch-size")
        try:
            train_tf = TrainTransform(cfg, inp["input_size"], inp["in_chans"], len(classes), inp["mean"],
                                      inp["std"]).to(device)
            eval_tf = EvalTransform(inp["input_size"], inp["in_chans"], inp["mean"], inp["std"]).to(device)
        except (TypeError, ValueError) as e:
            raise UserError(f"invalid augmentation settings: {e}") from None
        data = _Data(spec, classes, inp, splits, sampler, train_loader, eval_loader, train_tf, eval_tf)
        self._probe(model, data)
        return model, data

    def _probe(self, model: nn.Module, data: _Data) -> None:
        """One forward and backward pass of two blank images through the train transform and the model in training
        mode (under the run's autocast), then the eval transform and an eval-mode forward: a model keyword argument
        or a transform setting that fails, or gives a non-finite loss, is a :class:`UserError` now. Buffers and
        gradients are restored; the random state is reseeded by :meth:`_restore` afterwards."""
        cfg, device = self.cfg, self.info.device
        c, (h, w) = data.inp["in_chans"], data.inp["input_size"]
        images = torch.zeros(2, c, h, w, dtype=torch.uint8, device=device)
        labels = torch.zeros(2, dtype=torch.long, device=device)
        amp_dtype = AMP_DTYPES[cfg.amp]
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        what = f"model {cfg.model} (pe={cfg.pe}, model_kwargs={dict(cfg.model_kwargs)})"
        try:
            x, target = data.train_tf(images, labels)
            model.train()
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
            loss = classification_loss(logits, target, cfg.label_smoothing)
            loss.backward()
            if not math.isfinite(float(loss.detach())):
                raise UserError(f"{what} gives a non-finite loss ({float(loss.detach())}) on a blank batch with "
                                f"mean {data.inp['mean']} and std {data.inp['std']}")
            model.eval()
            with torch.no_grad():
                model(data.eval_tf(images))
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError) as e:
            msg = " ".join(str(e).split())[:300]
            raise UserError(f"{what} cannot train on {c}x{h}x{w} images with these settings: "
                            f"{type(e).__name__}: {msg}") from None
        finally:
            model.zero_grad(set_to_none=True)
            model.train()
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])

    def _build_optimization(self, model: nn.Module, steps_per_epoch: int) -> _Optimization:
        """AdamW (or SGD with momentum) on the model's param groups, the warmup + cosine schedule (warmup and
        cooldown shrunk to half of a short run), the fp16 gradient scaler and the EMA."""
        cfg, info = self.cfg, self.info
        global_batch = cfg.batch_size * info.world_size
        peak_lr = cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr
        groups = param_groups(model, cfg.weight_decay)
        optimizer: torch.optim.Optimizer
        if cfg.opt == "sgd":
            optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.opt_eps)
        warmup, cooldown = cfg.warmup_epochs, cfg.cooldown_epochs
        if warmup + cooldown > 0.5 * cfg.epochs:  # a short run: keep half of it for the cosine decay
            shrink = 0.5 * cfg.epochs / (warmup + cooldown)
            warmup, cooldown = warmup * shrink, cooldown * shrink
            self.log(f"note: {cfg.epochs} epochs is short for warmup {cfg.warmup_epochs:g} + cooldown "
                     f"{cfg.cooldown_epochs:g} epochs; using {warmup:g} + {cooldown:g}")
        sched = WarmupCosine(optimizer, peak_lr, cfg.epochs * steps_per_epoch,
                             warmup_steps=round(warmup * steps_per_epoch),
                             cooldown_steps=round(cooldown * steps_per_epoch),
                             warmup_lr=min(cfg.warmup_lr, peak_lr), min_lr=min(cfg.min_lr, peak_lr))
        scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
        ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        return _Optimization(optimizer, sched, scaler, ema, AMP_DTYPES[cfg.amp], peak_lr, global_batch)

    def _restore(self, ckpt: dict[str, Any] | None, resume_path: Path | None, model: nn.Module,
                 opt: _Optimization, log: JsonlLog) -> int:
        """Load the checkpoint's weights, optimizer, schedule, scaler, EMA and this rank's RNG state and return the
        epoch to start from; a fresh run seeds this rank's augmentation RNG and starts a new metrics log."""
        cfg, info = self.cfg, self.info
        if ckpt is None:
            seed_all(_rank_seed(cfg.seed, info.rank))
            if info.is_main and log.path.exists():
                log.path.unlink()
            return 0
        load_state_dict_checked(model, ckpt["state_dict"], f"checkpoint {resume_path}")
        opt.optimizer.load_state_dict(ckpt["optimizer"])
        opt.sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None:
            opt.scaler.load_state_dict(ckpt["scaler"])
        if opt.ema is not None:
            if not ckpt.get("ema"):
                raise UserError(f"checkpoint {resume_path} has no EMA state")
            opt.ema.load_state_dict(ckpt["ema"])
        start_epoch = int(ckpt["epoch"])
        restore_rng(ckpt["rng"][info.rank])
        if info.is_main:
            log.truncate_after(start_epoch)
        self.log(f"resumed {resume_path} at epoch {start_epoch}/{cfg.epochs}")
        return start_epoch

    def _epoch_loop(self, model: nn.Module, data: _Data, opt: _Optimization, log: JsonlLog, start_epoch: int,
                    stop_after_epoch: int | None, progress: bool | None) -> _Progress:
        """Wrap the model (DDP, compile), then per epoch: train, evaluate (every ``eval_every`` epochs and at the
        end), log the record, save the checkpoint and redraw the curves; stop early after ``stop_after_epoch``."""
        cfg, info, out = self.cfg, self.info, self.out
        device = info.device
        train_model: nn.Module = model
        if info.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]

        inp, spec, splits = data.inp, data.spec, data.splits
        train_tf, eval_tf = data.train_tf, data.eval_tf

        n_params = count_parameters(model)
        meta = {
            "model": {"name": cfg.model, "pe": cfg.pe, "kwargs": dict(cfg.model_kwargs),
                      "num_classes": len(data.classes), "params": n_params},
            "data": {"spec": str(spec), "classes": list(data.classes), "in_chans": inp["in_chans"],
                     "input_size": inp["input_size"], "mean": inp["mean"], "std": inp["std"],
                     "crop_pct": inp["crop_pct"], "eval_resize": splits.eval_resize},
        }
        if info.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        self.log(f"mpvg train: {cfg.model} pe={cfg.pe} ({n_params / 1e6:.3f} M params) on {spec} "
                 f"({len(splits.train)} train / {len(splits.test)} {splits.test_name} images, "
                 f"{len(data.classes)} classes); {info.world_size} process(es) on {device}, global batch "
                 f"{opt.global_batch} = {cfg.batch_size} x {info.world_size}, peak lr {opt.peak_lr:.3g}, "
                 f"{cfg.epochs} epochs x {len(data.train_loader)} steps, "
                 f"amp={cfg.amp}{', compile' if cfg.compile else ''}{', EMA' if opt.ema else ''}")

        show_bar = _show_progress(progress, info)
        done = _Progress(last={}, completed=start_epoch)
        if cfg.compile:
            self.log("compiling the model with torch.compile: the first step may take minutes; its time is "
                     "reported as compile_s and left out of images/s")
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            stats = self._train_epoch(train_model, model, data.train_loader, data.sampler, train_tf, opt.optimizer,
                                      opt.sched, opt.scaler, opt.ema, opt.amp_dtype, epoch, show_bar,
                                      warm_up=cfg.compile and epoch == start_epoch)
            t_train = time.perf_counter() - t0 - stats["warmup_s"]
            images = stats["images"] - stats["warmup_images"]
            if images <= 0:  # an epoch of one step: nothing but the warm-up to time
                t_train, images = t_train + stats["warmup_s"], stats["images"]
            done.train_time += t_train
            done.train_images += images
            done.compile_time += stats["warmup_s"]
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": stats["loss"],
                                      "lr": opt.sched.get_last_lr()[0],
                                      "train_images_per_s": images / t_train, "train_time_s": t_train}
            if stats["warmup_s"]:
                record["compile_s"] = stats["warmup_s"]
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or epoch + 1 == stop_after_epoch:
                res = evaluate(model, data.eval_loader, eval_tf, device, opt.amp_dtype, info)
                if opt.ema is not None:
                    res_ema = evaluate(opt.ema.module, data.eval_loader, eval_tf, device, opt.amp_dtype, info)
                    record.update(top1=res_ema["top1"], top5=res_ema["top5"], eval_loss=res_ema["loss"],
                                  top1_raw=res["top1"], top5_raw=res["top5"], eval_loss_raw=res["loss"])
                else:
                    record.update(top1=res["top1"], top5=res["top5"], eval_loss=res["loss"])
                record["eval_images"] = res["n"]
            record["epoch_time_s"] = time.perf_counter() - t0
            rng_states = D.all_gather_objects(capture_rng(), info)
            if info.is_main:
                log.append(record)
                save_checkpoint(out / CHECKPOINT_NAME, {
                    **meta, "config": config_to_dict(cfg), "epoch": epoch + 1, "world_size": info.world_size,
                    "state_dict": model.state_dict(), "ema": opt.ema.state_dict() if opt.ema is not None else None,
                    "optimizer": opt.optimizer.state_dict(), "scheduler": opt.sched.state_dict(),
                    "scaler": opt.scaler.state_dict() if opt.scaler.is_enabled() else None, "rng": rng_states,
                    "metrics": record,
                })
                self._saved_epoch = epoch + 1
                try:
                    plot_curves(log.read(), out / "curves.png", f"{cfg.model} pe={cfg.pe} on {spec}")
                except UserError:  # e.g. the job is being stopped: not a plotting problem
                    raise
                except Exception as e:  # noqa: BLE001 - a plotting failure must not stop training
                    print(f"warning: could not draw curves.png: {e}", file=sys.stderr)
            done.last = record
            done.completed = epoch + 1
            self._print_epoch(record, cfg.epochs)
            D.barrier(info)
            self._saved_epoch = epoch + 1  # on every rank: rank 0 wrote it before the barrier
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.epochs:
                self.log(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
                break
        return done

    def _finish(self, model: nn.Module, data: _Data, opt: _Optimization, log: JsonlLog, done: _Progress,
                t_start: float) -> dict[str, Any]:
        """Check that the ranks hold the same weights, write ``summary.json`` and report where everything is."""
        cfg, info, out = self.cfg, self.info, self.out
        spec, splits = data.spec, data.splits
        digests = D.all_gather_objects(weights_digest(model), info)
        last, completed = done.last, done.completed
        summary = {
            "top1": last.get("top1"), "top5": last.get("top5"), "eval_loss": last.get("eval_loss"),
            "top1_raw": last.get("top1_raw"), "eval_split": splits.test_name, "eval_images": last.get("eval_images"),
            "epochs": completed, "epochs_planned": cfg.epochs, "finished": completed >= cfg.epochs,
            "train_images_per_s": done.train_images / done.train_time if done.train_time > 0 else None,
            "train_images": done.train_images, "train_time_s": done.train_time,
            "compile_s": done.compile_time if cfg.compile else None,
            "wall_s": time.perf_counter() - t_start, "params": count_parameters(model), "model": cfg.model,
            "pe": cfg.pe, "model_kwargs": dict(cfg.model_kwargs), "data": str(spec), "num_classes": len(data.classes),
            "world_size": info.world_size, "batch_size_per_process": cfg.batch_size,
            "global_batch": opt.global_batch, "peak_lr": opt.peak_lr, "amp": cfg.amp, "compile": cfg.compile,
            "ema": cfg.ema, "seed": cfg.seed, "device": str(info.device), "backend": _backend_name(info.device),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "ranks_in_sync": len(set(digests)) == 1, "weights_sha256": digests,
            "checkpoint": str(out / CHECKPOINT_NAME), "metrics": str(out / "metrics.jsonl"),
            "curves": str(out / "curves.png"),
        }
        if info.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if summary["top1"] is not None:
                self.log(f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  on the {summary['eval_images']} "
                         f"held-out {splits.test_name} images of {spec} ({cfg.model}, pe={cfg.pe}, {completed} epochs, "
                         f"{summary['wall_s']:.0f} s, {summary['train_images_per_s']:.0f} train images/s)")
            self.log(f"curves:     {out / 'curves.png'}\nmetrics:    {out / 'metrics.jsonl'}\n"
                     f"summary:    {out / 'summary.json'}\ncheckpoint: {out / CHECKPOINT_NAME}")
        D.barrier(info)
        return summary

    # ------------------------------------------------------------------------------------------------------------
    def _train_epoch(self, train_model: nn.Module, model: nn.Module, loader: DataLoader, sampler: D.ShardedSampler,
                     tf: TrainTransform, optimizer: torch.optim.Optimizer, sched: WarmupCosine,
                     scaler: torch.amp.GradScaler, ema: ModelEma | None, amp_dtype: torch.dtype | None, epoch: int,
                     show_bar: bool, warm_up: bool = False) -> dict[str, float]:
        """One epoch of training steps; returns the mean loss over all ranks and the images seen. ``warm_up``: the
        first step compiles (``torch.compile``), so its time and images are returned apart (``warmup_s``,
        ``warmup_images``)."""
        cfg, device = self.cfg, self.info.device
        train_model.train()
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n = 0
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       file=sys.stderr)
        params = [p for p in model.parameters() if p.requires_grad]
        warmup_s, warmup_images = 0.0, 0
        for step, (x, y) in enumerate(loader):
            t_step = time.perf_counter()
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            x, target = tf(x, y)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = train_model(x)
            loss = classification_loss(logits, target, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach().double() * x.shape[0]
            n += x.shape[0]
            if warm_up and step == 0:
                warmup_s = time.perf_counter() - t_step
                warmup_images = x.shape[0] * self.info.world_size
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step + 1 == len(loader):
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if bar is not None:
            bar.close()
        total_loss, total_n = D.all_reduce_sum([float(loss_sum), float(n)], self.info)
        mean_loss = total_loss / max(total_n, 1)
        if not math.isfinite(mean_loss):
            kept = (f"the checkpoint of epoch {epoch} in {self.out / CHECKPOINT_NAME} is kept as it was" if epoch
                    else "no checkpoint was written")
            raise UserError(f"training diverged in epoch {epoch + 1}: the mean loss is {mean_loss}; {kept} (lower "
                            "--lr, set --clip-grad, or use --amp bf16 instead of fp16)")
        return {"loss": mean_loss, "images": int(total_n), "warmup_s": warmup_s, "warmup_images": warmup_images}

    def _print_epoch(self, r: dict[str, Any], epochs: int) -> None:
        acc = f"  top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}" if r.get("top1") is not None else ""
        self.log(f"epoch {r['epoch']:>3}/{epochs}  loss {r['train_loss']:.4f}{acc}  lr {r['lr']:.2e}  "
                 f"{r['train_images_per_s']:.0f} img/s  {r['epoch_time_s']:.1f} s")


def _backend_name(device: torch.device) -> str:
    try:
        from ..ops import backends

        return str(backends.resolve_backend(device))
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"
