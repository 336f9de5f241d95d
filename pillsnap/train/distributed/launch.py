"""Starting the ranks of one training: `python -m torch.distributed.run` as a child of the training task.

    results = run_training_processes(cfg_dict, stage, stage_dir, init, plans, spec)   # {model: result dict}

On several machines node 0's training task runs this; every other node runs `pillsnap train-node`
(`pillsnap/train/distributed/node.py`), which reads the attempt's job from the shared stage folder and joins its
rendezvous (`join_training_processes`).

The child runs in its own process session, so cancelling, crashing or timing out kills the whole group (the
torchrun agent and every rank) and no rank keeps holding a GPU; on Linux it also dies with its parent. Rank 0's log
lines go to this process's "pillsnap" logger (the task forwards them to its run log), its progress to this process's
progress listeners (the task's progress artifact); rank 0 writes the results, which are read back here. A failed
run raises DistributedRunFailed naming the exception a rank raised (the task decides whether a retry can help).
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from pillsnap import progress
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.train.distributed.worker import PROGRESS
from pillsnap.train.distributed.world import LaunchSpec

log = logging.getLogger("pillsnap.train.distributed")
KILL_GRACE_S = 10
TICK_S = 1.0


class DistributedRunFailed(RuntimeError):
    def __init__(self, message: str, exception_type: str = ""):
        super().__init__(message)
        self.exception_type = exception_type


JOB, ENDED = "job.json", "ended.json"  # in <stage>/distributed/: what an attempt runs, and that it is over


def torchrun_command(spec: LaunchSpec, job: Path) -> list:
    """Several nodes meet at node 0 by torchrun's static rendezvous: node k's processes are group k, so global rank
    0 (which writes checkpoints and the results) is on node 0, which runs the stage. (The c10d rendezvous ignores
    --node_rank and numbers the nodes by host name and process id.)"""
    rendezvous = (["--standalone"] if spec.nnodes == 1 else
                  ["--rdzv_backend=static", f"--rdzv_endpoint={spec.rdzv_endpoint}"])
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}",
            f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}", *rendezvous,
            "-m", "pillsnap.train.distributed.worker", str(job)]


def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when this process dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def kill_group(process: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the child's whole process group (torchrun passes it to the ranks), SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_training_processes(config: Dict[str, Any], stage: int, stage_dir: Path,
                           init_checkpoints: Optional[Dict[str, str]], plans: Optional[Dict[str, Any]],
                           spec: LaunchSpec, timeout_s: Optional[float] = None) -> Dict[str, Dict[str, Any]]:
    work = Path(stage_dir) / "distributed"
    work.mkdir(parents=True, exist_ok=True)
    for stale in [*work.glob("error_rank*.json"), work / "result.json"]:
        stale.unlink(missing_ok=True)
    attempt = uuid.uuid4().hex[:16]
    job = write_json_atomic(work / JOB, {"config": config, "stage": stage, "stage_dir": str(stage_dir),
                                         "init_checkpoints": init_checkpoints, "plans": plans,
                                         "backend": spec.backend, "attempt": attempt, "nnodes": spec.nnodes,
                                         "rdzv_endpoint": spec.rdzv_endpoint})
    code = None
    try:
        code = run_torchrun(torchrun_command(spec, job), spec, timeout_s)
    finally:  # the other nodes stop waiting for this attempt
        write_json_atomic(work / ENDED, {"attempt": attempt, "code": code})
    if code != 0:
        raise _failure(work, code)
    return json.loads((work / "result.json").read_text())


def join_training_processes(job: Path, spec: LaunchSpec, timeout_s: Optional[float] = None) -> int:
    """Another node's ranks in node 0's attempt (`job`): rank 0, on node 0, writes the results; returns torchrun's
    exit code."""
    return run_torchrun(torchrun_command(spec, Path(job)), spec, timeout_s)


def run_torchrun(command: list, spec: LaunchSpec, timeout_s: Optional[float]) -> int:
    log.info("training on %d process(es) x %d node(s) (%s), this node %d: %s", spec.nproc_per_node, spec.nnodes,
             spec.backend, spec.node_rank, " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in _lines(process, timeout_s):
            _relay(line)
        return process.wait()
    finally:  # a cancel, a crash of this process or a timeout: no rank survives it
        kill_group(process)


def _lines(process: subprocess.Popen, timeout_s: Optional[float]) -> Iterator[str]:
    """The child's output line by line (a progress bar's carriage returns end lines too). The wait for output wakes
    every TICK_S even while the ranks print nothing (a hung collective, a long compile): the deadline is checked,
    and an exception raised into this thread (how Prefect times out a task running in a worker thread) arrives
    within a tick instead of at the next line."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    fd, pending = process.stdout.fileno(), b""
    while True:
        ready, _, _ = select.select([fd], [], [], TICK_S)
        if deadline and time.monotonic() > deadline:
            raise DistributedRunFailed(f"the training processes ran past {timeout_s} s", "TimeoutError")
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the child closed its output: it is exiting
            break
        *done, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
        yield from (line.decode(errors="replace") for line in done)
    if pending:
        yield pending.decode(errors="replace")


def _relay(line: str) -> None:
    if line.startswith(PROGRESS):
        try:
            report = json.loads(line[len(PROGRESS):])
            progress.relay(report["desc"], report["done"], report["total"])
            return
        except (ValueError, KeyError):  # a line another process wrote into: show it as it came
            pass
    if line.strip():
        log.info("%s", line)


def _failure(work: Path, code: int) -> DistributedRunFailed:
    """The FIRST rank's failure: the others then fail in a collective ("connection closed by peer"), which says
    nothing about the cause."""
    errors = sorted(work.glob("error_rank*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not errors:
        return DistributedRunFailed(f"the training processes exited with code {code} and no rank said why")
    first = json.loads(errors[0].read_text())
    return DistributedRunFailed(f"{errors[0].stem}: {first['type']}: {first['message']}", first["type"])
