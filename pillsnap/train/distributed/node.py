"""A node other than node 0 in a multi-node training: it joins the stage's training and nothing else.

Node 0 runs the stage flow: it tunes, trains, decides, reports and writes the ledger. Its training task writes each
attempt's job into the experiment folder every node shares (`<stage>/distributed/job.json`: the resolved config,
the batch plans, the warm starts, an attempt id that is also the rendezvous id) and starts its own ranks.
`pillsnap train-node` on node k waits for an attempt that has not ended, joins its rendezvous with this node's
processes and exits with the group (`--follow`: then waits for the next attempt, e.g. the task's retry or the next
stage). It takes no experiment lock and writes nothing but its ranks' log lines (and, when one of its ranks fails,
that rank's error file next to the job, where node 0 names the first failure).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Set, Tuple

from pillsnap.config import ConfigError, PillSnapConfig
from pillsnap.core import layout
from pillsnap.core.jsonio import read_json
from pillsnap.train.distributed.launch import ENDED, JOB, join_training_processes
from pillsnap.train.distributed.world import LaunchSpec, launch_spec

log = logging.getLogger("pillsnap.train.distributed")
POLL_S = 1.0


class NoAttempt(TimeoutError):
    """No training attempt started within the wait; the message says where this node looked."""


def next_attempt(work: Path, joined: Set[str], wait_s: Optional[float] = None) -> Tuple[Path, str]:
    """The job of an attempt that has not ended and this node has not joined yet, as soon as node 0 writes one."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        job, ended = work / JOB, work / ENDED
        if job.is_file():
            attempt = read_json(job)["attempt"]
            if attempt not in joined and (not ended.is_file() or read_json(ended)["attempt"] != attempt):
                return job, attempt
        if deadline is not None and time.monotonic() > deadline:
            raise NoAttempt(f"no training attempt started in {work} within {wait_s:g} s (node 0's training task "
                            "writes one when it starts; is this the experiment folder node 0 shares?)")
        time.sleep(POLL_S)


def node_spec(cfg: PillSnapConfig, job: dict) -> LaunchSpec:
    """This node's processes in node 0's group; the group's shape must be the one this node was configured for."""
    dist = cfg.train.distributed
    if dist.node_rank == 0:
        raise ConfigError("train.distributed.node_rank=0 is the node that runs the stage (`pillsnap stage`); give "
                          "this node its own rank, train.distributed.node_rank=1..nnodes-1")
    spec = launch_spec(dist)
    for key, ours, theirs in (("nnodes", spec.nnodes, job["nnodes"]),
                              ("rdzv_endpoint", spec.rdzv_endpoint, job["rdzv_endpoint"])):
        if ours != theirs:
            raise ConfigError(f"train.distributed.{key}={ours!r} on this node, but node 0's attempt uses {theirs!r}")
    return LaunchSpec(spec.nproc_per_node, spec.nnodes, spec.node_rank, spec.rdzv_endpoint, job["backend"])


def join_stage_training(cfg: PillSnapConfig, stage: int, follow: bool = False,
                        wait_s: Optional[float] = None) -> int:
    """Join the stage's training attempts from this node; returns the last group's exit code."""
    work = layout.stage_dir(cfg.exp_dir, stage) / "distributed"
    joined: Set[str] = set()
    while True:
        log.info("node %d: waiting for a stage %d training attempt in %s", cfg.train.distributed.node_rank, stage,
                 work)
        job, attempt = next_attempt(work, joined, wait_s)
        spec = node_spec(cfg, read_json(job))
        joined.add(attempt)
        code = join_training_processes(job, spec)
        log.info("node %d: attempt %s ended with exit code %d", spec.node_rank, attempt, code)
        if not follow:
            return code
