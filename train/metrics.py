"""Per-epoch metric files (``metrics.csv`` and ``metrics.json`` in the output folder) and the
one-line summary printed at the end of a run."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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


def summary_line(model: str, top1: float, top5: float, macs: int, params: int, **extra) -> str:
    """``summary model=... top1=..% top5=..% macs=..M params=..M`` plus ``extra`` as key=value."""
    text = (f"summary model={model} top1={top1:.2f}% top5={top5:.2f}% macs={macs / 1e6:.2f}M "
            f"params={params / 1e6:.3f}M")
    for key, value in extra.items():
        text += f" {key}={value:.2f}" if isinstance(value, float) else f" {key}={value}"
    return text
