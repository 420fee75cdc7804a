"""Evaluate a model: ``python -m train.evaluate --checkpoint runs/x/best.pth``.

The model name, dataset, data folder, test split, input size and ``--convert`` options default to
those the checkpoint was trained with; any of them can be given on the command line (and must be for a plain
``state_dict`` file). Everything else (``--val-subset``, workers, device, ...) is this command's own.
A checkpoint of ``python -m train`` is verified against its SHA-256 first, as ``--resume`` does.
``--results-file PATH`` also writes the results as JSON (as timm's validate.py, none by default).
Runs under ``torchrun`` too: every rank evaluates its shard and the counts are summed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from butterfly import use_backend

from . import error_message
from .args import (HelpFormatter, add_convert_args, add_data_args, check_args,
                   resolve_resources)
from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError, build_datasets, describe, eval_loader
from .distributed import Context, barrier, cleanup, setup, sum_across
from .metrics import summary_line
from .model import build_weights, count_macs, count_params, create_model
from .rundir import OutputError, file_problem, write_atomic

# What a checkpoint's training arguments say about the model and its data; the rest is ours.
INHERITED = ("model", "dataset", "data_dir", "val_split", "img_size", "small_input", "convert",
             "convert_base", "convert_residual", "convert_linear")


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
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of 'python -m train' (last.pth, best.pth) or a state_dict file")
    p.add_argument("--model", default=None, help="timm model name (default: the checkpoint's)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--results-file", default=None, metavar="PATH",
                   help="also write the results (model, checkpoint, top1, top5, loss, images, "
                        "img_size, ...) to this JSON file (default: none, as timm's validate.py)")
    add_data_args(p)
    add_convert_args(p)
    return p


def parse_args(argv: Optional[List[str]] = None):
    """Parse ``argv``; defaults come from the checkpoint's training arguments when it has them."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.results_file is not None:  # before any work: a long evaluation must not end in this
        problem = file_problem(first.results_file, "--results-file")
        if problem:
            parser.error(problem)
    try:
        state = load_checkpoint(first.checkpoint, "evaluated", plain_ok=True)
    except CheckpointError as err:
        parser.error(str(err))
    saved = state.get("args") if isinstance(state, dict) and isinstance(state.get("args"), dict) else {}
    parser.set_defaults(**{k: v for k, v in saved.items() if k in INHERITED})
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error(f"{args.checkpoint} does not say which model it holds: pass --model NAME")
    check_args(args, parser)
    resolve_resources(args)
    args.state = state
    return args


def write_results(result: Dict[str, Any], path: str) -> None:
    """``result`` as an indented JSON object, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(result, indent=4) + "\n"
    write_atomic(path, lambda f: f.write(text), needed=len(text.encode()))


def run(args) -> Dict[str, float]:
    """Evaluate as ``args`` say; returns loss, top1, top5, images, macs, params (and writes
    ``--results-file``)."""
    ctx = setup(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        info = describe(args, ctx.rank, lambda: barrier(ctx))
        small = args.small_input if args.small_input is not None else args.dataset == "fashion-mnist"
        model = create_model(args.model, info.num_classes, info.in_chans, small)
        model = build_weights(model, args, args.state, args.checkpoint, ema=args.ema)
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
            if args.results_file:
                write_results(results_record(args, result, size[-1]), args.results_file)
        return result
    finally:
        torch.set_num_threads(threads)
        cleanup(ctx)


def results_record(args, result: Dict[str, float], img_size: int) -> Dict[str, Any]:
    """The results file's content: timm validate.py's keys plus ours."""
    return {"model": args.model, "checkpoint": os.path.abspath(args.checkpoint), "ema": args.ema,
            "dataset": args.dataset, "split": args.val_split if args.dataset == "imagefolder"
            else "t10k", "top1": round(result["top1"], 4), "top1_err": round(100 - result["top1"], 4),
            "top5": round(result["top5"], 4), "top5_err": round(100 - result["top5"], 4),
            "loss": round(result["loss"], 6), "images": result["images"], "img_size": img_size,
            "param_count": round(result["params"] / 1e6, 4), "macs": result["macs"]}


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, DataError, OutputError) as err:
        raise SystemExit(f"error: {error_message(err)}") from err


if __name__ == "__main__":
    main()
