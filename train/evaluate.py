"""Evaluate a model: ``python -m train.evaluate --checkpoint runs/x/best.pth``.

The model name, dataset and input size default to those the checkpoint was trained with; any of
them can be given on the command line (and must be for a plain ``state_dict`` file). Runs under
``torchrun`` too: every rank evaluates its shard and the counts are summed.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from butterfly import use_backend

from .args import add_data_args, check_args
from .checkpoint import CheckpointError, model_weights, read_file
from .data import build_datasets, describe, eval_loader
from .distributed import Context, barrier, cleanup, setup, sum_across
from .metrics import summary_line
from .model import count_macs, count_params, create_model


def autocast(ctx: Context, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: Context, amp: bool = False,
             channels_last: bool = False) -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the whole loader, summed across ranks."""
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for x, y in loader:
        x = x.to(ctx.device, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(ctx, amp):
            out = model(x)
        out = out.float()
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum")
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hits = top.eq(y[:, None])
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        count += y.numel()
    model.train(was_training)
    loss_sum, correct1, correct5, count = sum_across(
        ctx, [float(v) for v in (loss_sum, correct1, correct5, count)])
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss_sum / count, "top1": 100 * correct1 / count,
            "top5": 100 * correct5 / count, "images": int(count)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of 'python -m train' (last.pth, best.pth) or a state_dict file")
    p.add_argument("--model", default=None, help="timm model name (default: the checkpoint's)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    add_data_args(p)
    return p


def parse_args(argv: Optional[List[str]] = None):
    """Parse ``argv``; defaults come from the checkpoint's training arguments when it has them."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    try:
        state = read_file(first.checkpoint)
    except CheckpointError as err:
        parser.error(str(err))
    saved = state.get("args") if isinstance(state, dict) and isinstance(state.get("args"), dict) else {}
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k != "checkpoint"})
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error(f"{args.checkpoint} does not say which model it holds: pass --model NAME")
    check_args(args, parser)
    args.state = state
    return args


def run(args) -> Dict[str, float]:
    ctx = setup(args.device)
    try:
        info = describe(args, ctx.rank, lambda: barrier(ctx))
        small = args.small_input if args.small_input is not None else args.dataset == "fashion-mnist"
        model = create_model(args.model, info.num_classes, info.in_chans, small)
        try:
            model.load_state_dict(model_weights(args.state, ema=args.ema))
        except RuntimeError as err:
            raise CheckpointError(f"{args.checkpoint} does not fit {args.model} with "
                                  f"{info.num_classes} classes: {str(err).splitlines()[0]}") from err
        _, val_set = build_datasets(args, info, model, train=False)
        size = val_set[0][0].shape
        macs, params = count_macs(model, size), count_params(model)
        model.to(ctx.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        amp = args.amp if args.amp is not None else ctx.device.type == "cuda"
        loader = eval_loader(val_set, args.eval_batch_size, args.workers, ctx.world, ctx.rank,
                             ctx.device.type == "cuda")
        with use_backend(args.bft_backend):
            result = evaluate(model, loader, ctx, amp, args.channels_last)
        result.update(macs=macs, params=params)
        if ctx.is_main:
            print(summary_line(args.model, result["top1"], result["top5"], macs, params,
                               loss=result["loss"], images=result["images"]), flush=True)
        return result
    finally:
        cleanup(ctx)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
