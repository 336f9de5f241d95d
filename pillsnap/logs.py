"""Logging set-up for entry points: console plus per-stage files (logs/train.out, logs/train.err)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, not the stream that was current when it was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    logging.getLogger("pillsnap").setLevel(level)


def attach_stage_files(log_dir: Path) -> List[logging.Handler]:
    """train.out gets everything from the library, train.err warnings and errors; returns them for detaching."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    handlers: List[logging.Handler] = []
    for name, level in (("train.out", logging.INFO), ("train.err", logging.WARNING)):
        h = logging.FileHandler(log_dir / name)
        h.setLevel(level)
        h.setFormatter(logging.Formatter(FORMAT))
        handlers.append(h)
    lib = logging.getLogger("pillsnap")
    for h in handlers:
        lib.addHandler(h)
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    return handlers


def detach(handlers: List[logging.Handler]) -> None:
    lib = logging.getLogger("pillsnap")
    for h in handlers:
        lib.removeHandler(h)
        h.close()
