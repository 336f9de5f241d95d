"""Exclusive lock files: one training run per experiment at a time (refused when busy), and builders of one shared
folder (the pixel store, a stage's detector dataset) taking turns (waiting).

fcntl locks are released by the OS when the holder dies, so a crashed run never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ExperimentBusy(RuntimeError):
    pass


@contextmanager
def experiment_lock(exp_dir: Path, what: str) -> Iterator[None]:
    path = Path(exp_dir) / ".train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            raise ExperimentBusy(f"{exp_dir} is busy: another run holds {path} ({holder})") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def wait_for_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock at `path`, waiting while another process (a rank, a second run) holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
