"""Command-line options for ``python -m train``, the paper's recipes as presets, and fail-fast checks.

A recipe only sets defaults: built-in defaults < ``--recipe`` < what is written on the command line.
The learning rate of a recipe is ``lr_base`` for a global batch of ``lr_base_size`` images and is
scaled linearly to the actual global batch (``--batch-size`` x processes) unless ``--lr`` is given.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

# Paper (../shared/BFT.md section 4): SGD, cross-entropy, weight decay 1e-5 for all. It does not
# state batch size, momentum or augmentation; lr 0.5 at a global batch of 1024 with momentum 0.9 is
# what the ShuffleNetV2 authors used with the same lr, and timm's default augmentation applies.
_PAPER = {"opt": "sgd", "momentum": 0.9, "weight_decay": 1e-5, "lr_base": 0.5, "lr_base_size": 1024,
          "batch_size": 256, "smoothing": 0.0, "warmup_epochs": 0, "min_lr": 0.0}

RECIPES: Dict[str, Dict] = {
    # Short schedule for Fashion-MNIST and other small datasets (the default).
    "fashion-mnist": {"opt": "sgd", "momentum": 0.9, "weight_decay": 5e-5, "lr_base": 0.1,
                      "lr_base_size": 32, "batch_size": 32, "epochs": 5, "sched": "cosine",
                      "warmup_epochs": 0.1, "warmup_lr": 0.01, "min_lr": 0.0, "smoothing": 0.0},
    # 170 epochs, lr 0.5 constant, x0.1 at epochs 140 and 160.
    "mobilenetv1": dict(_PAPER, epochs=170, sched="multistep", decay_milestones=[140, 160],
                        decay_rate=0.1),
    # 300 epochs, lr 0.5 decayed linearly to 0 (timm's poly schedule with power 1).
    "shufflenetv2": dict(_PAPER, epochs=300, sched="poly", decay_rate=1.0),
    # 200 epochs: 5-epoch linear warm-up from 0.1 to 0.5, then cosine to 0.
    "mobilenetv3": dict(_PAPER, epochs=200, sched="cosine", warmup_epochs=5, warmup_lr=0.1,
                        warmup_prefix=True),
}

DATASETS = ("fashion-mnist", "imagefolder")
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Options shared by training and evaluation: dataset, model input, loader."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="fashion-mnist",
                   help="fashion-mnist, or an ImageFolder tree (--data-dir with train/ and val/)")
    g.add_argument("--data-dir", default=None,
                   help="ImageFolder root, or where to look first for the Fashion-MNIST IDX files")
    g.add_argument("--train-split", default="train", help="ImageFolder subfolder for training")
    g.add_argument("--val-split", default="val", help="ImageFolder subfolder for evaluation")
    g.add_argument("--train-subset", type=_positive_int, default=None,
                   help="train on this many images (a fixed random subset, same for every seed)")
    g.add_argument("--val-subset", type=_positive_int, default=None,
                   help="evaluate on the first N validation images")
    g.add_argument("--img-size", type=_positive_int, default=None,
                   help="input resolution (default: 28 for Fashion-MNIST, the model's for ImageFolder)")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="small-input stem for 28x28 or 32x32 inputs (default: on for Fashion-MNIST); "
                        "only passed to models that accept it")
    g.add_argument("--workers", type=_non_negative_int, default=2, help="data loader processes per rank")
    g.add_argument("--eval-batch-size", type=_positive_int, default=256)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for GPU, off for CPU)")
    g.add_argument("--bft-backend", default="auto",
                   help="implementation of the BFT layers: auto, reference, cpu, triton")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", description="Train a timm model (BFT zoo or timm's own).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenetv1_bft_100", help="any registered timm model name")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fashion-mnist",
                   help="preset of optimization defaults (the paper's recipes); options override it")
    add_data_args(p)

    g = p.add_argument_group("validation")
    g.add_argument("--val-holdout", type=_positive_int, default=None, metavar="N",
                   help="validate on N images held out of the training split (a fixed random "
                        "subset, the same for every seed) and train on the rest; the test split "
                        "is then not used during training")
    g.add_argument("--eval-test", action="store_true",
                   help="after the last epoch, evaluate the final model once on the test split "
                        "(Fashion-MNIST t10k / --val-split; --val-subset applies) and record "
                        "test_top1, test_loss")

    g = p.add_argument_group("optimization (defaults come from --recipe)")
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--batch-size", type=_positive_int, help="images per process and step")
    g.add_argument("--lr", type=_non_negative_float, default=None,
                   help="absolute learning rate (default: lr-base scaled to the global batch)")
    g.add_argument("--lr-base", type=_non_negative_float)
    g.add_argument("--lr-base-size", type=_positive_int)
    g.add_argument("--opt", help="timm optimizer name (sgd, momentum, adamw, rmsprop, ...)")
    g.add_argument("--momentum", type=_non_negative_float)
    g.add_argument("--weight-decay", type=_non_negative_float,
                   help="for conv/linear weights; BFT weights, norms and biases get none")
    g.add_argument("--sched", choices=SCHEDULERS, help="timm scheduler, stepped every iteration")
    g.add_argument("--decay-milestones", type=_positive_int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-rate", type=_non_negative_float, default=0.1,
                   help="multistep/step factor; the power for poly")
    g.add_argument("--warmup-epochs", type=_non_negative_float, help="may be a fraction")
    g.add_argument("--warmup-lr", type=_non_negative_float, default=1e-5)
    g.add_argument("--warmup-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="warm-up comes before the --epochs of the schedule")
    g.add_argument("--min-lr", type=_non_negative_float)
    g.add_argument("--clip-grad", type=_non_negative_float, default=None, help="max gradient norm")

    g = p.add_argument_group("regularization")
    g.add_argument("--smoothing", type=_non_negative_float, help="label smoothing")
    g.add_argument("--mixup", type=_non_negative_float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=_non_negative_float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--drop", type=_non_negative_float, default=None,
                   help="dropout before the classifier")
    g.add_argument("--aa", default=None,
                   help="timm auto-augment policy (ImageFolder), e.g. rand-m9-mstd0.5")
    g.add_argument("--color-jitter", type=_non_negative_float, default=0.4, help="(ImageFolder)")
    g.add_argument("--reprob", type=_non_negative_float, default=0.0,
                   help="random erasing probability (ImageFolder)")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--model-ema", action="store_true",
                   help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=_non_negative_float, default=0.9998)

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=None,
                   help="output folder (default: runs/<model>-<dataset>-<time>, or the --resume one)")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from exactly (e.g. runs/x/last.pth)")
    g.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="also write last.pth every N steps (0: only at the end of every epoch)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Debug/test aids: not part of the normal interface.
    g.add_argument("--stop-after-steps", type=_positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--print-digest", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the chosen recipe's values as defaults; then check the arguments.

    With ``--resume`` the checkpoint is loaded and verified here (a damaged one stops the run
    before any work), and the arguments it was trained with become the defaults."""
    from .checkpoint import CheckpointError, load_checkpoint
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    parser.set_defaults(**RECIPES[first.recipe])
    state = None
    if first.resume is not None:
        try:
            state = load_checkpoint(first.resume)
        except CheckpointError as err:
            parser.error(str(err))
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in state["args"].items() if k in known})
        parser.set_defaults(output=os.path.dirname(os.path.abspath(first.resume)))
    args = parser.parse_args(argv)
    args.lr_explicit = args.lr is not None
    args.resume_state = state
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    check_args(args, parser, training=True)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
               training: bool = False) -> None:
    """Fail before any work: unknown model, missing folders or files, inconsistent options."""
    import timm  # imported here so that --help stays fast
    from timm.optim import list_optimizers

    from butterfly import available_backends  # importing butterfly registers its models with timm
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        parser.error(f"unknown model '{args.model}'. Close names: {', '.join(close) or 'none'}; "
                     "see timm.list_models() for all registered models")
    if training and args.opt.lower() not in list_optimizers():
        parser.error(f"--opt {args.opt}: not a timm optimizer (see timm.optim.list_optimizers())")
    if args.bft_backend not in available_backends():
        parser.error(f"--bft-backend {args.bft_backend}: choose one of {available_backends()}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} does not exist or is not a folder")
    if args.dataset == "imagefolder":
        if args.data_dir is None:
            parser.error("--dataset imagefolder needs --data-dir (a folder with train/ and val/ "
                         "subfolders, one folder of images per class)")
        test_split = not training or not getattr(args, "val_holdout", None) or args.eval_test
        for split in ([args.train_split] if training else []) + ([args.val_split] if test_split else []):
            if not os.path.isdir(os.path.join(args.data_dir, split)):
                parser.error(f"{os.path.join(args.data_dir, split)} is missing: an ImageFolder "
                             "dataset needs one subfolder per split, each with a folder per class")
    if training and args.sched == "multistep" and args.decay_milestones != sorted(args.decay_milestones):
        parser.error(f"--decay-milestones must be increasing, got {args.decay_milestones}")
