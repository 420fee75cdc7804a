"""Command-line options for ``python -m train``, the paper's recipes as presets, and fail-fast checks.

A recipe only sets defaults: built-in defaults < ``--recipe`` < what is written on the command line.
The learning rate of a recipe is ``lr_base`` for a global batch of ``lr_base_size`` images and is
scaled linearly to the actual global batch (``--batch-size`` x processes) unless ``--lr`` is given.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Dict, List, Optional

# The paper (Alizadeh Vahid et al., CVPR 2020, section 4 and its training recipes): SGD,
# cross-entropy, weight decay 1e-5 for all. It does not state batch size, momentum or augmentation;
# lr 0.5 at a global batch of 1024 with momentum 0.9 is what the ShuffleNetV2 authors used with
# the same lr, and timm's default augmentation applies.
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
IMAGEFOLDER_AUG = ("scale", "ratio", "aa", "color_jitter", "reprob")  # not for Fashion-MNIST


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where there is a value to show and the help has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _value(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def by_recipe(key: str, text: str = "", builtin: Any = None) -> str:
    """``text`` plus the value each recipe gives ``key`` (``builtin`` for those that set none)."""
    values = [f"{name} recipe {_value(r[key])}" for name, r in sorted(RECIPES.items()) if key in r]
    if builtin is not None and len(values) < len(RECIPES):
        values.append(f"other recipes {_value(builtin)}")
    return f"{text} (default: {', '.join(values)})".strip()


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
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


# ------------------------------------------------------------------------ cores, threads, workers
def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), shared with the other processes of
    this node under ``torchrun``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers(dataset: str, cores: int) -> int:
    """Fashion-MNIST is in memory and a batch is ready in about a millisecond: a loader process
    only takes a core from the model, so none up to 4 cores. ImageFolder decodes every image: half
    the cores, 1 to 8."""
    if dataset == "fashion-mnist":
        return 0 if cores <= 4 else 1
    return min(8, max(1, cores // 2))


def default_threads(workers: int, cores: int) -> int:
    """``OMP_NUM_THREADS`` when set (torchrun sets 1), else the cores the loader processes leave."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, cores - workers)


def resolve_resources(args: argparse.Namespace) -> None:
    """Fill in ``--workers`` and ``--threads`` left to their defaults."""
    cores = available_cores()
    if args.workers is None:
        args.workers = default_workers(args.dataset, cores)
    if args.threads is None:
        args.threads = default_threads(args.workers, cores)


# ------------------------------------------------------------------------------------ the parser
def add_data_args(p: argparse.ArgumentParser) -> None:
    """Options shared by training and evaluation: dataset, model input, loader, machine."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="fashion-mnist",
                   help="fashion-mnist, or an ImageFolder tree (--data-dir with train/ and val/)")
    g.add_argument("--data-dir", default=None,
                   help="ImageFolder root, or where to look first for the Fashion-MNIST IDX files")
    g.add_argument("--train-split", default="train", help="ImageFolder subfolder for training")
    g.add_argument("--val-split", default="val",
                   help="ImageFolder subfolder for evaluation (the test split)")
    g.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                   help="train on N images (a fixed random subset, the same for every seed)")
    g.add_argument("--val-subset", type=_positive_int, default=None, metavar="N",
                   help="evaluate on N test-split images (a fixed random subset)")
    g.add_argument("--img-size", type=_positive_int, default=None,
                   help="input resolution (default: 28 for Fashion-MNIST, the model's for ImageFolder)")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="small-input stem for 28x28 or 32x32 inputs (default: on for Fashion-MNIST); "
                        "only passed to models that accept it")
    g.add_argument("--workers", type=_non_negative_int, default=None,
                   help="data loader processes per rank (default: from the cores available; "
                        "Fashion-MNIST: 0 up to 4 cores, else 1; ImageFolder: half the cores, 1-8)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads per rank (default: OMP_NUM_THREADS if set, else "
                        "the available cores minus --workers, at least 1)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=256,
                   help="images per evaluation batch")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for GPU, off for CPU)")
    g.add_argument("--bft-backend", default="auto",
                   help="implementation of the BFT layers, one of butterfly.available_backends(): "
                        "auto, reference, cpu, triton")


def _base(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a base >= 2, got {text}")
    return value


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """``--convert``: the model's pointwise layers as BFTs (butterfly.convert); training and
    evaluation."""
    g = p.add_argument_group(
        "conversion to BFT",
        "--convert replaces the pointwise convolutions of --model by BFTs, as butterfly.convert "
        "does. Dense weights of --model (--initial-checkpoint, or evaluate's --checkpoint) are "
        "loaded first and the BFTs fitted to them; the weights of a network converted with "
        "butterfly.convert (a state_dict saved after it) load into BFTs of the layouts they hold, "
        "whatever base and residual the conversion used.")
    g.add_argument("--convert", action="store_true",
                   help="use --model with its pointwise layers converted to BFTs")
    g.add_argument("--convert-base", type=_base, default=4,
                   help="BFT base of the converted layers (butterfly.convert's base)")
    g.add_argument("--convert-residual", choices=("auto", "true", "false"), default="auto",
                   help="butterfly.convert's residual: auto fits with and without the identity "
                        "and keeps the better")
    g.add_argument("--convert-linear", action="store_true",
                   help="also convert nn.Linear layers (butterfly.convert's linear=True)")


def _add_optimization_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization (defaults come from --recipe)")
    g.add_argument("--epochs", type=_positive_int, help=by_recipe("epochs", "training epochs"))
    g.add_argument("--batch-size", type=_positive_int,
                   help=by_recipe("batch_size", "images per process and step"))
    g.add_argument("--lr", type=_non_negative_float, default=None,
                   help="absolute learning rate (default: --lr-base x global batch / --lr-base-size)")
    g.add_argument("--lr-base", type=_non_negative_float,
                   help=by_recipe("lr_base", "lr for a global batch of --lr-base-size"))
    g.add_argument("--lr-base-size", type=_positive_int,
                   help=by_recipe("lr_base_size", "the global batch --lr-base is for"))
    g.add_argument("--opt", help=by_recipe("opt", "timm optimizer name (sgd, adamw, rmsprop, ...)"))
    g.add_argument("--momentum", type=_non_negative_float, help=by_recipe("momentum", "SGD momentum"))
    g.add_argument("--weight-decay", type=_non_negative_float,
                   help=by_recipe("weight_decay", "for conv/linear weights; BFT weights, norms "
                                  "and biases get none"))
    g.add_argument("--bft-weight-decay", type=_non_negative_float, default=0.0,
                   help="weight decay of the BFT weights (default 0, the paper's choice)")
    g.add_argument("--bft-lr-scale", type=_positive_float, default=1.0,
                   help="learning-rate multiplier of the BFT weights (default 1)")
    g.add_argument("--sched", choices=SCHEDULERS,
                   help=by_recipe("sched", "timm scheduler, stepped every iteration"))
    g.add_argument("--decay-milestones", type=_positive_int, nargs="+", default=[90, 180, 270],
                   help=by_recipe("decay_milestones", "multistep epochs", [90, 180, 270]))
    g.add_argument("--decay-rate", type=_non_negative_float, default=0.1,
                   help=by_recipe("decay_rate", "multistep/step factor; the power for poly", 0.1))
    g.add_argument("--warmup-epochs", type=_non_negative_float,
                   help=by_recipe("warmup_epochs", "may be a fraction"))
    g.add_argument("--warmup-lr", type=_non_negative_float, default=1e-5,
                   help=by_recipe("warmup_lr", "lr at the start of the warm-up", 1e-5))
    g.add_argument("--warmup-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help=by_recipe("warmup_prefix", "warm-up comes before the --epochs of the "
                                  "schedule", False))
    g.add_argument("--min-lr", type=_non_negative_float,
                   help=by_recipe("min_lr", "lr at the end of the schedule"))
    g.add_argument("--clip-grad", type=_non_negative_float, default=None, help="max gradient norm")


def _add_augmentation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "regularization and augmentation",
        "Fashion-MNIST: a random shift of up to 2 pixels and --hflip. ImageFolder above 64 pixels: "
        "timm's ImageNet augmentation (random resized crop --scale 0.08 1, --ratio 0.75 1.33, "
        "--hflip 0.5, --color-jitter 0.4); at 64 pixels or less: a random crop of the image padded "
        "by size/8 pixels, no flip, no color jitter (--scale or --ratio: timm's resized crop).")
    g.add_argument("--smoothing", type=_non_negative_float,
                   help=by_recipe("smoothing", "label smoothing"))
    g.add_argument("--mixup", type=_non_negative_float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=_non_negative_float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--drop", type=_non_negative_float, default=None,
                   help="dropout before the classifier (default: the model's)")
    g.add_argument("--scale", type=_probability, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="ImageFolder: random resized crop area range (default: 0.08 1 above 64 "
                        "pixels; none at 64 or less)")
    g.add_argument("--ratio", type=_non_negative_float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="ImageFolder: random resized crop aspect range (default: 0.75 1.33)")
    g.add_argument("--hflip", type=_probability, default=None,
                   help="horizontal flip probability (default: 0.5 for Fashion-MNIST and ImageFolder "
                        "above 64 pixels, 0 at 64 or less)")
    g.add_argument("--aa", default=None,
                   help="ImageFolder: timm auto-augment policy, e.g. rand-m9-mstd0.5 (default: off)")
    g.add_argument("--color-jitter", type=_non_negative_float, default=None,
                   help="ImageFolder (default: 0.4 above 64 pixels, 0 at 64 or less)")
    g.add_argument("--reprob", type=_probability, default=0.0,
                   help="ImageFolder: random erasing probability")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--model-ema", action="store_true",
                   help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=_non_negative_float, default=0.9998,
                   help="EMA decay per step")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--val-holdout", type=_positive_int, default=None, metavar="N",
                   help="validate on N images held out of the training split (a fixed random "
                        "subset, the same for every seed) and train on the rest; the test split "
                        "is then not used during training")
    g.add_argument("--eval-test", action="store_true",
                   help="after the last epoch, evaluate the final model once on the test split "
                        "(Fashion-MNIST t10k / --val-split; --val-subset applies) and record "
                        "test_top1, test_loss")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, data order and augmentation")
    g.add_argument("--output", default=None,
                   help="output folder (default: runs/<model>-<dataset>-<time>, or the --resume one)")
    g.add_argument("--overwrite", action="store_true",
                   help="reuse an --output folder that holds an earlier run, replacing its files")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from exactly (e.g. runs/x/last.pth); options that "
                        "would change the run (schedule, data, model, ...) are refused unless "
                        "they equal the checkpoint's")
    g.add_argument("--extend", action="store_true",
                   help="with --resume: rebuild the learning-rate schedule from this command "
                        "line's schedule options (--epochs, --lr, --sched, warm-up, ...) and "
                        "continue on it from the checkpoint's step, e.g. --epochs 10 to train a "
                        "finished 5-epoch run 5 epochs more")
    g.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                   help="start from these model weights (a checkpoint of this trainer, verified, or "
                        "a state_dict file); with --convert: dense weights to convert, or a "
                        "network converted with butterfly.convert, to fine-tune")
    g.add_argument("--checkpoint-every", type=_non_negative_int, default=0,
                   help="also write last.pth every N steps (0: only at the end of every epoch)")
    g.add_argument("--log-tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard curves in the output folder (default: on when the tensorboard "
                        "package is installed)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Debug/test aids: not part of the normal interface.
    g.add_argument("--stop-after-steps", type=_positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--print-digest", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", description="Train a timm model (BFT zoo or timm's own).",
        formatter_class=HelpFormatter)
    p.add_argument("--model", default="mobilenetv1_bft_100", help="any registered timm model name")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fashion-mnist",
                   help="preset of optimization defaults (the paper's recipes); options override it")
    add_data_args(p)
    add_convert_args(p)
    _add_optimization_args(p)
    _add_augmentation_args(p)
    _add_run_args(p)
    return p


# ------------------------------------------------------------------------------------- parsing
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the chosen recipe's values as defaults; then check the arguments.

    With ``--resume`` the checkpoint is loaded and verified here (a damaged one stops the run
    before any work), and the arguments it was trained with become the defaults; so is an
    ``--initial-checkpoint``."""
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
    if args.extend and state is None:
        parser.error("--extend continues a run on a new schedule: it needs --resume PATH")
    if state is not None:
        check_resume(args, parser, state)
    args.lr_explicit = args.lr is not None
    args.resume_state = state
    args.initial_state = None
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    check_args(args, parser, training=True)
    check_training_args(args, parser)
    if args.initial_checkpoint is not None and state is None:
        try:
            args.initial_state = load_checkpoint(args.initial_checkpoint, "loaded", plain_ok=True)
        except CheckpointError as err:
            parser.error(f"--initial-checkpoint: {err}")
    resolve_resources(args)
    return args


# What a --resume may change: how the run is carried out, not what it computes (up to rounding;
# see the thread-count warning), and where the data is. Everything else is fixed by the checkpoint,
# options added later included.
RESUME_FREE = frozenset({
    "workers", "threads", "device", "amp", "bft_backend", "channels_last", "compile",
    "eval_batch_size", "no_progress", "log_tensorboard", "checkpoint_every", "data_dir", "eval_test",
    "output", "overwrite", "resume", "extend", "stop_after_steps", "print_digest"})
# What --resume --extend may change as well: the learning-rate schedule, rebuilt from them.
SCHEDULE = ("epochs", "lr", "lr_base", "lr_base_size", "sched", "decay_milestones", "decay_rate",
            "warmup_epochs", "warmup_lr", "warmup_prefix", "min_lr")


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return _value(value)


def _same(a: Any, b: Any) -> bool:
    plain = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return plain(a) == plain(b)


def check_resume(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 state: Dict[str, Any]) -> None:
    """A resume continues the run exactly: an option whose value differs from the checkpoint's is
    an error naming both values (the checkpoint's arguments are the defaults, so only what is
    written on the command line can differ). With ``--extend`` the schedule options may change."""
    saved = state.get("args", {})
    free = RESUME_FREE | (frozenset(SCHEDULE) if args.extend else frozenset())
    changed = [a for a in parser._actions if a.dest in saved and a.dest not in free
               and not _same(getattr(args, a.dest), saved[a.dest])]
    if changed:
        def shown(dest: str, value: Any) -> str:
            return "unset (lr from --lr-base)" if dest == "lr" and value is None else _shown(value)
        items = "; ".join(f"{a.option_strings[0]} is {shown(a.dest, saved[a.dest])} in the "
                          f"checkpoint, {shown(a.dest, getattr(args, a.dest))} on the command line"
                          for a in changed)
        how = ("To continue the run exactly, leave these options out (the checkpoint's values "
               "apply)")
        if not args.extend and any(a.dest in SCHEDULE for a in changed):
            how += ("; to train longer or on another schedule, add --extend (the schedule is "
                    "rebuilt from the new options and goes on from the checkpoint's step)")
        how += ("; to start a new run from its weights, pass --initial-checkpoint "
                f"{args.resume} and another --output instead of --resume")
        parser.error(f"--resume {args.resume} continues a run exactly, and this command changes "
                     f"what the checkpoint fixes: {items}. {how}")
    done = state.get("epoch", 0)
    if args.extend and args.epochs <= done:
        parser.error(f"--extend: the checkpoint has finished {done} epochs, so --epochs "
                     f"{args.epochs} leaves nothing to train; give --epochs larger than {done}")


def _check_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--device`` names a device torch has, and ``--bft-backend`` can run on it."""
    import torch

    from butterfly import available_backends, use_backend
    from butterfly.ops import backend_for
    if args.bft_backend not in available_backends():
        parser.error(f"--bft-backend {args.bft_backend}: choose one of {available_backends()}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device name (cpu, cuda, cuda:1)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU on this machine "
                     "(torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if args.bft_backend != "auto":
        with use_backend(args.bft_backend):
            try:
                backend_for(device)
            except RuntimeError as err:
                parser.error(f"--bft-backend {args.bft_backend}: {err}")


def _check_data(args: argparse.Namespace, parser: argparse.ArgumentParser, training: bool) -> None:
    from .data import find_fashion_mnist, looks_like_imagefolder
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} does not exist or is not a folder")
    if args.dataset == "fashion-mnist":
        if (args.data_dir is not None and find_fashion_mnist(args.data_dir) != args.data_dir
                and looks_like_imagefolder(args.data_dir)):
            parser.error(f"--data-dir {args.data_dir} holds an ImageFolder tree (folders of images) "
                         "and no Fashion-MNIST IDX files: pass --dataset imagefolder to train on it")
        return
    if args.data_dir is None:
        parser.error("--dataset imagefolder needs --data-dir (a folder with train/ and val/ "
                     "subfolders, one folder of images per class)")
    test_split = not training or not getattr(args, "val_holdout", None) or args.eval_test
    for split in ([args.train_split] if training else []) + ([args.val_split] if test_split else []):
        if not os.path.isdir(os.path.join(args.data_dir, split)):
            parser.error(f"{os.path.join(args.data_dir, split)} is missing: an ImageFolder "
                         "dataset needs one subfolder per split, each with a folder per class")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
               training: bool = False) -> None:
    """Fail before any work: unknown model, missing folders or files, a device or BFT backend this
    machine lacks."""
    import timm  # imported here so that --help stays fast

    import butterfly  # noqa: F401  (registers its models with timm)
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        parser.error(f"unknown model '{args.model}'. Close names: {', '.join(close) or 'none'}; "
                     "see timm.list_models() for all registered models")
    _check_device(args, parser)
    _check_data(args, parser, training)


def check_training_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Options of training only: optimizer, schedule, augmentation, output folder, TensorBoard."""
    from timm.optim import list_optimizers

    from .metrics import tensorboard_available
    from .rundir import output_problem
    if args.opt.lower() not in list_optimizers():
        parser.error(f"--opt {args.opt}: not a timm optimizer (see timm.optim.list_optimizers())")
    if args.sched == "multistep" and args.decay_milestones != sorted(args.decay_milestones):
        parser.error(f"--decay-milestones must be increasing, got {args.decay_milestones}")
    if args.dataset == "fashion-mnist":
        given = [name for name in IMAGEFOLDER_AUG if getattr(args, name) != parser.get_default(name)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} applies to --dataset imagefolder only; "
                         "Fashion-MNIST's augmentation is a shift of up to 2 pixels and --hflip")
    for name in ("scale", "ratio"):
        low_high = getattr(args, name)
        if low_high is not None and not 0 < low_high[0] <= low_high[1]:
            parser.error(f"--{name} {_value(low_high)}: expected 0 < MIN <= MAX")
    if args.log_tensorboard is None:
        args.log_tensorboard = tensorboard_available()
    elif args.log_tensorboard and not tensorboard_available():
        parser.error("--log-tensorboard needs the tensorboard package: pip install tensorboard "
                     "(or pass --no-log-tensorboard)")
    if args.output is not None:
        problem = output_problem(args.output, reuse=args.resume is not None or args.overwrite)
        if problem:
            parser.error(problem)
