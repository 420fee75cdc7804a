"""The training run behind ``python -m train``: model, timm optimizer/scheduler/EMA/mixup, the
epoch loop, checkpoints and an exact resume, TensorBoard curves; a diverged run stops at its first
non-finite loss and never overwrites a good checkpoint."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from butterfly import param_groups, use_backend

from .checkpoint import (CheckpointError, checkpoint_args, digest, list_ranks,
                         rng_state, save_checkpoint, set_rng_state)
from .data import (build_datasets, describe, eval_loader, load_test_set, steps_per_epoch,
                   train_loader)
from .distributed import Context, barrier, cleanup, gather_objects, setup, sum_across
from .evaluate import autocast, evaluate
from .metrics import TensorBoardLog, summary_line, write_args, write_history
from .model import build_weights, count_macs, count_params, create_model
from .rundir import prepare, remove_stale_temps, write_atomic

_log = logging.getLogger("train")


class TrainingError(RuntimeError):
    """The run cannot go on: its loss or weights are no longer finite."""


def all_finite(tensors: Dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    flags = [torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


class Trainer:
    """One training run. ``run()`` trains every remaining epoch and returns the final metrics."""

    def __init__(self, args, ctx: Context):
        self.args, self.ctx = args, ctx
        self.started = time.time()
        self.output = args.output
        self.lock = None  # the run folder's lock, held until close()
        if ctx.is_main:  # before any data is read: a folder that cannot be written fails now
            overwrite = getattr(args, "overwrite", False)
            self.lock = prepare(self.output, reuse=args.resume_state is not None or overwrite,
                                overwrite=overwrite, since=self.started)
        try:
            self._setup(args, ctx)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (the process's end releases it too)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _setup(self, args, ctx: Context) -> None:
        self.amp = args.amp if args.amp is not None else ctx.device.type == "cuda"
        seed_all(args.seed)  # the same initial weights on every rank
        self.info = info = describe(args, ctx.rank, lambda: barrier(ctx))
        self.model = self._build_model(info)
        train_set, val_set = build_datasets(args, info, self.model)
        pin = ctx.device.type == "cuda"
        self.loader, self.sampler = train_loader(train_set, args.batch_size, args.workers,
                                                 ctx.world, ctx.rank, args.seed, pin)
        self.val_loader = eval_loader(val_set, args.eval_batch_size, args.workers, ctx.world,
                                      ctx.rank, pin)
        self.steps = steps_per_epoch(len(train_set), args.batch_size, ctx.world)
        self._build_optimization(info.num_classes)

        wrapped = DistributedDataParallel(self.model, device_ids=[ctx.device.index] if pin else None) \
            if ctx.distributed else self.model
        if args.compile and ctx.device.type == "cpu":
            # Inductor's CPU layout optimisation makes conv inputs channels-last and compiles the
            # backward for the first input's strides, so a later input size (the last, smaller
            # batch of an epoch) fails its stride check, with or without BFT layers.
            torch._inductor.config.layout_optimization = False
        self.train_model = torch.compile(wrapped) if args.compile else wrapped
        self.eval_model = torch.compile(self.model) if args.compile else self.model

        # Position: the next step to take is step `step_in_epoch` of epoch `epoch`.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list = []
        self.best_top1 = -1.0
        self.partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of the epoch so far (all ranks)
        if args.resume_state is not None:
            self._restore(args.resume_state)
        else:
            seed_all(args.seed + ctx.rank)  # dropout and mixup draw differently on every rank
        if ctx.is_main:
            self._log_start(len(train_set), len(val_set))

    def _log_start(self, train_images: int, val_images: int) -> None:
        args = self.args
        val = "held out of the training split" if args.val_holdout else "the test split"
        _log.info("run: %s, %s, %d training images, %d validation images (%s), %d steps/epoch x %d "
                  "epochs, global batch %d, lr %g, device %s, threads=%d workers=%d, output %s",
                  args.model, args.dataset, train_images, val_images, val, self.steps, self.epochs,
                  self.global_batch, self.lr, self.ctx.device, torch.get_num_threads(),
                  args.workers, self.output)

    def _build_model(self, info) -> nn.Module:
        args = self.args
        small = args.small_input if args.small_input is not None else args.dataset == "fashion-mnist"
        model = create_model(args.model, info.num_classes, info.in_chans, small, args.drop)
        if args.resume_state is not None:  # the structure (--convert); _restore loads the state
            model = build_weights(model, args, args.resume_state, f"--resume {args.resume}",
                                  load=False)
        else:
            model = build_weights(model, args, getattr(args, "initial_state", None),
                                  f"--initial-checkpoint {args.initial_checkpoint}")
        if info.img_size is None:
            info.img_size = resolve_data_config({}, model=model)["input_size"][-1]
        self.input_size = (info.in_chans, info.img_size, info.img_size)
        self.macs, self.params = count_macs(model, self.input_size), count_params(model)
        model.to(self.ctx.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.sync_bn and self.ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _build_optimization(self, num_classes: int) -> None:
        """timm's optimizer, per-step scheduler, EMA and mixup; BFT weights get no weight decay."""
        args = self.args
        self.global_batch = args.batch_size * self.ctx.world
        self.lr = args.lr if args.lr_explicit else args.lr_base * self.global_batch / args.lr_base_size
        groups = param_groups(self.model, args.weight_decay, args.bft_weight_decay,
                              args.bft_lr_scale)
        self.optimizer = create_optimizer_v2(groups,
                                             opt=args.opt, lr=self.lr, momentum=args.momentum,
                                             weight_decay=args.weight_decay)
        self.scheduler, self.epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs,
            decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            warmup_prefix=args.warmup_prefix, step_on_epochs=False, updates_per_epoch=self.steps)
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay) if args.model_ema else None
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                               label_smoothing=args.smoothing, num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ checkpoints
    def _state(self, partial) -> Dict:
        rngs = gather_objects(self.ctx, rng_state())
        return {"model_name": self.args.model, "args": checkpoint_args(self.args),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "world_size": self.ctx.world,
                "model": unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_rng": self.ema._sr_generator.get_state() if self.ema is not None else None,
                "rng": rngs, "history": self.history, "best_top1": self.best_top1,
                "partial": partial, "threads": torch.get_num_threads()}

    def save(self, best: bool = False, partial=(0.0, 0.0, 0.0)) -> None:
        """Write ``last.pth`` (all ranks take part: they hand over their RNG states). ``partial``:
        the summed training metrics of the epoch so far, for a checkpoint taken mid-epoch."""
        state = self._state(list(partial))
        if not all_finite(state["model"]) or (self.ema is not None and not all_finite(state["ema"])):
            raise TrainingError(
                f"the weights are no longer finite after step {self.global_step} (the training "
                f"diverged); they were not saved. {self._last_good()} Lower --lr or set --clip-grad")
        if self.ctx.is_main:
            remove_stale_temps(self.output, self.started)
            path = os.path.join(self.output, "last.pth")
            save_checkpoint(state, path)
            if best:
                with open(path, "rb") as src:
                    write_atomic(os.path.join(self.output, "best.pth"),
                                 lambda f: shutil.copyfileobj(src, f), binary=True,
                                 needed=os.path.getsize(path))

    def _last_good(self) -> str:
        last = os.path.join(self.output, "last.pth")
        if os.path.exists(last):
            return f"{last} holds the last good checkpoint."
        return "No checkpoint had been written yet."

    def _restore(self, state: Dict) -> None:
        if state["model_name"] != self.args.model:
            raise CheckpointError(f"the checkpoint holds {state['model_name']}, not {self.args.model}")
        list_ranks(state["rng"], self.ctx.world)
        if state["args"]["batch_size"] != self.args.batch_size:
            raise CheckpointError(f"the checkpoint was trained with --batch-size "
                                  f"{state['args']['batch_size']}; resume with the same batch size")
        self.model.load_state_dict(state["model"])
        # The optimizer's groups carry the schedule's base lr ("initial_lr"), which timm's
        # schedulers start from: --extend keeps the one of the new options, as its scheduler.
        fresh = [g.get("initial_lr") for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        if getattr(self.args, "extend", False):
            for group, initial in zip(self.optimizer.param_groups, fresh):
                group["initial_lr"] = initial
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise CheckpointError("the checkpoint has no EMA weights: resume without --model-ema")
            self.ema.load_state_dict(state["ema"])
            self.ema._sr_generator.set_state(state["ema_rng"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.history = state["global_step"], list(state["history"])
        self.best_top1 = state["best_top1"]
        self.partial = list(state["partial"]) if self.ctx.is_main else [0.0, 0.0, 0.0]
        set_rng_state(state["rng"][self.ctx.rank])
        if self.ctx.is_main:
            _log.info("resumed from epoch %d step %d (global step %d)", self.epoch + 1,
                      self.step_in_epoch, self.global_step)
            if getattr(self.args, "extend", False):
                _log.info("--extend: the schedule is rebuilt from this command's options (%d "
                          "epochs, lr %g, %s) and goes on from global step %d", self.epochs,
                          self.lr, self.args.sched, self.global_step)
            saved, now = state.get("threads"), torch.get_num_threads()
            if saved is not None and saved != now:
                _log.warning("warning: the checkpoint was written with %d torch threads and this "
                             "run uses %d: the continuation will not be bit-exact (CPU kernels sum "
                             "weight gradients in a thread-dependent order); resume with "
                             "--threads %d to continue exactly", saved, now, saved)

    # ------------------------------------------------------------------------ training
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns ``[loss sum, correct, images]`` of the batch."""
        args, ctx = self.args, self.ctx
        x = x.to(ctx.device, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        self.scheduler.step_update(num_updates=self.global_step)
        with autocast(ctx, self.amp):
            out = self.train_model(x)
            loss = self.criterion(out, target)
        self._check_loss(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.optimizer.step()
        self.global_step += 1
        self.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        with torch.no_grad():
            n = torch.tensor(float(y.numel()), dtype=torch.float64, device=ctx.device)
            return torch.stack([loss.detach().double() * n, (out.argmax(1) == y).sum().double(), n])

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss, before it reaches the weights (on GPU this waits for
        the step's forward pass). Under torchrun the other ranks are stopped by torchrun."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"the training loss is {value} at epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch + 1} (global step {self.global_step + 1}): the training "
                f"diverged, and stopped. {self._last_good()} Lower --lr, set --clip-grad, or "
                "train without --amp")

    def train_epoch(self) -> Dict[str, float]:
        args, ctx = self.args, self.ctx
        self.sampler.set_position(self.epoch, self.step_in_epoch * args.batch_size)
        self.train_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, images
        bar = tqdm(total=self.steps, initial=self.step_in_epoch, unit="step", dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{self.epochs}", file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets few lines
                   disable=not ctx.is_main or args.no_progress)
        start, images = time.perf_counter(), 0
        for x, y in self.loader:
            sums += self._step(x, y)
            images += y.numel()
            bar.update()
            if not bar.disable and (self.step_in_epoch % 10 == 0 or self.step_in_epoch == self.steps):
                loss_sum, correct, n = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{100 * correct / n:.1f}%",
                                img_s=f"{images * ctx.world / (time.perf_counter() - start):.0f}")
            if (args.checkpoint_every and self.global_step % args.checkpoint_every == 0
                    and self.step_in_epoch < self.steps):
                reduced = sum_across(ctx, sums.tolist())
                self.save(partial=[a + b for a, b in zip(self.partial, reduced)])
            if args.stop_after_steps is not None and self.global_step >= args.stop_after_steps:
                bar.close()
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill, as a crash or preemption would
        bar.close()
        elapsed = time.perf_counter() - start
        loss_sum, correct, n = [a + b for a, b in zip(self.partial, sum_across(ctx, sums.tolist()))]
        self.partial = [0.0, 0.0, 0.0]
        return {"train_loss": loss_sum / n, "train_top1": 100 * correct / n,
                "train_images_per_s": images * ctx.world / elapsed}

    def evaluate_test(self) -> Dict[str, float]:
        """``test_top1``, ``test_top5``, ``test_loss`` of the current model on the test split."""
        args, ctx = self.args, self.ctx
        loader = eval_loader(load_test_set(args, self.info, self.model), args.eval_batch_size,
                             args.workers, ctx.world, ctx.rank, ctx.device.type == "cuda")
        test = evaluate(self.eval_model, loader, ctx, self.amp, args.channels_last)
        if ctx.is_main:
            _log.info("test split (%d images): top-1 %.2f%%, loss %.4f", test["images"],
                      test["top1"], test["loss"])
        return {f"test_{k}": v for k, v in test.items()}

    def run(self) -> Dict[str, float]:
        args, ctx = self.args, self.ctx
        tensorboard = None
        if ctx.is_main:
            resumed = ({"resume": args.resume, "extend": getattr(args, "extend", False)}
                       if getattr(args, "resume", None) else {})
            write_args(dict(checkpoint_args(args), **resumed), self.output)
            if args.log_tensorboard:
                tensorboard = TensorBoardLog(self.output, start=self.epoch)
        try:
            return self._run(tensorboard)
        finally:
            if tensorboard is not None:
                tensorboard.close()

    def _run(self, tensorboard: Optional[TensorBoardLog]) -> Dict[str, float]:
        args, ctx = self.args, self.ctx
        record: Dict[str, float] = dict(self.history[-1]) if self.history else {}
        while self.epoch < self.epochs:
            record = {"epoch": self.epoch + 1, **self.train_epoch(),
                      "lr": self.optimizer.param_groups[0]["lr"]}  # of the epoch's last step
            val = evaluate(self.eval_model, self.val_loader, ctx, self.amp, args.channels_last)
            record.update({f"val_{k}": v for k, v in val.items() if k != "images"})
            if self.ema is not None:
                ema = evaluate(self.ema.module, self.val_loader, ctx, self.amp, args.channels_last)
                record.update({f"ema_val_{k}": v for k, v in ema.items() if k != "images"})
            self.history.append(record)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            best = record["val_top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, record["val_top1"])
            self.save(best=best)
            if ctx.is_main:
                write_history(self.history, self.output)
                if tensorboard is not None:
                    tensorboard.log(record)
                _log.info("epoch %d/%d: train loss %.4f, val top-1 %.2f%%, top-5 %.2f%%",
                          self.epoch, self.epochs, record["train_loss"], record["val_top1"],
                          record["val_top5"])
        if args.eval_test and record:
            record = dict(record, **self.evaluate_test())
            if ctx.is_main:
                write_history(self.history[:-1] + [record], self.output)
                if tensorboard is not None:
                    tensorboard.log({k: v for k, v in record.items()
                                     if k == "epoch" or k.startswith("test_")})
        if args.print_digest:
            params = {k: v for k, v in unwrap_model(self.model).named_parameters()}
            print(f"digest rank={ctx.rank} {digest(params)}", flush=True)
        result = dict(record, macs=self.macs, params=self.params, output=self.output,
                      history=[dict(h) for h in self.history])
        if ctx.is_main and record:
            extra = {"ema_top1": record["ema_val_top1"]} if "ema_val_top1" in record else {}
            print(summary_line(args.model, record["val_top1"], record["val_top5"], self.macs,
                               self.params, **extra,
                               images_per_s=record["train_images_per_s"]), flush=True)
        return result


def default_output(args) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{args.model}-{args.dataset}-{stamp}")


def run(args, ctx: Optional[Context] = None) -> Dict[str, float]:
    """Train as ``args`` say (see :func:`train.args.parse_args`); returns the last epoch's metrics
    (with ``--eval-test`` also ``test_top1``, ``test_top5``, ``test_loss``, ``test_images``) plus
    ``macs``, ``params``, ``output`` (the folder with checkpoints and metrics) and ``history`` (one
    dict per epoch: epoch, train_loss, train_top1, lr, val_loss, val_top1, val_top5, ...)."""
    own = ctx is None
    ctx = ctx or setup(args.device)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        if args.output is None:
            args.output = gather_objects(ctx, default_output(args))[0]  # rank 0's clock
        with use_backend(args.bft_backend):
            trainer = Trainer(args, ctx)
            try:
                return trainer.run()
            finally:
                trainer.close()
    finally:
        torch.set_num_threads(threads)
        if own:
            cleanup(ctx)
