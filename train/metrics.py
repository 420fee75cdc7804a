"""What a run writes beside its checkpoints: per-epoch metric files (``metrics.csv``,
``metrics.json``), the arguments (``args.yaml``, as timm's train.py writes them), TensorBoard
curves (when the ``tensorboard`` package is installed), and the one-line summary printed at the end."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from typing import Any, Dict, List

from .rundir import write_atomic


def _write_atomic(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text), needed=len(text.encode()))


def write_history(history: List[Dict], folder: str) -> None:
    """Write the metrics of every finished epoch so far. The history travels in the checkpoint, so
    after a resume the files hold each epoch exactly once."""
    columns: List[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    _write_atomic(os.path.join(folder, "metrics.csv"), buf.getvalue())
    _write_atomic(os.path.join(folder, "metrics.json"), json.dumps(history, indent=1) + "\n")


def _plain(value: Any) -> Any:
    """Tuples as lists, so that ``yaml.safe_dump`` takes every argument."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_args(args: Dict[str, Any], folder: str) -> None:
    """``args.yaml``: the run's arguments, one ``name: value`` per line."""
    import yaml
    text = yaml.safe_dump({k: _plain(v) for k, v in args.items()}, default_flow_style=False)
    _write_atomic(os.path.join(folder, "args.yaml"), text)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _tag(key: str) -> str:
    """``val_top1`` -> ``val/top1``, ``ema_val_loss`` -> ``ema_val/loss``, ``lr`` -> ``train/lr``."""
    for prefix in ("ema_val_", "val_", "test_", "train_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


class TensorBoardLog:
    """Per-epoch scalars in ``folder`` (``events.out.tfevents.*``), x axis = epoch. After a resume
    from epoch ``start`` the curves continue from there (later events of the old log are purged)."""

    def __init__(self, folder: str, start: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=folder, purge_step=start + 1 if start else None)

    def log(self, record: Dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not key.endswith("images"):
                self.writer.add_scalar(_tag(key), value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def summary_line(model: str, top1: float, top5: float, macs: int, params: int, **extra) -> str:
    """``summary model=... top1=..% top5=..% macs=..M params=..M`` plus ``extra`` as key=value."""
    text = (f"summary model={model} top1={top1:.2f}% top5={top5:.2f}% macs={macs / 1e6:.2f}M "
            f"params={params / 1e6:.3f}M")
    for key, value in extra.items():
        text += f" {key}={value:.2f}" if isinstance(value, float) else f" {key}={value}"
    return text
