"""``python -m train [options]``: train a model (see ``python -m train --help``)."""
from __future__ import annotations

import logging
import os
from typing import List, Optional

from . import error_message
from .args import parse_args
from .checkpoint import CheckpointError
from .data import DataError
from .rundir import OutputError


def main(argv: Optional[List[str]] = None) -> None:
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    args = parse_args(argv)  # exits with a message on bad arguments, before any work
    from .loop import TrainingError, run
    try:
        run(args)
    except (CheckpointError, DataError, OutputError, TrainingError) as err:
        raise SystemExit(f"error: {error_message(err)}") from err


if __name__ == "__main__":
    main()
