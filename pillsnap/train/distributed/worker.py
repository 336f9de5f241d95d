"""What every rank runs under torchrun: `python -m pillsnap.train.distributed.worker JOB.json`.

The job file (written by launch.py) holds the resolved config, the stage and its folder, the warm-start checkpoints,
the batch / worker plans and the backend. Each rank joins the process group, trains its slice of every global batch
with train_stage, and rank 0 writes the results beside the job file. Rank 0 logs at INFO and reports progress as
`PILLSNAP_PROGRESS {json}` lines on stdout (launch.py relays both into the training task); the other ranks log
warnings only, each line prefixed with its rank. A rank that fails writes what failed beside the job file.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional

PROGRESS = "PILLSNAP_PROGRESS "


def _logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(name)s: %(message)s" if rank else
                                           "%(name)s: %(message)s"))
    lib = logging.getLogger("pillsnap")
    lib.handlers[:] = [handler]
    lib.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    lib.propagate = False


def _report_progress(desc: str, done: int, total: Optional[int]) -> None:
    # One write per line: every rank shares torchrun's stdout, and print() writes the text and the newline apart.
    sys.stdout.write(PROGRESS + json.dumps({"desc": desc, "done": done, "total": total}) + "\n")
    sys.stdout.flush()


def run(job_path: Path) -> None:
    import torch

    from pillsnap import progress
    from pillsnap.config import from_dict
    from pillsnap.core.jsonio import write_json_atomic
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path
    from pillsnap.data.subsets import read_subset
    from pillsnap.environment import torchrun_rank
    from pillsnap.train.distributed.world import join_world
    from pillsnap.train.run import train_stage
    from pillsnap.train.services.policy import resolve_policy

    job = json.loads(job_path.read_text())
    cfg = from_dict(job["config"])
    comm = join_world(job["backend"], *torchrun_rank(), cfg.train.distributed.timeout_minutes)
    _logging(comm.rank)
    try:
        if comm.is_main:
            progress.add_listener(_report_progress)
        subset, _ = read_subset(cfg.exp_dir, job["stage"])
        results = train_stage(cfg, subset, ClassMap.load(class_map_path(cfg)), job["stage"], Path(job["stage_dir"]),
                              job.get("init_checkpoints"), job.get("plans"), show_progress=False,
                              policy=resolve_policy(cfg.optimization, str(comm.device)), comm=comm)
        if comm.is_main:
            write_json_atomic(job_path.with_name("result.json"),
                              {name: result.as_dict() for name, result in results.items()})
    except BaseException as exc:  # a failed rank says what failed; torchrun then stops the others
        write_json_atomic(job_path.with_name(f"error_rank{comm.rank}.json"),
                          {"type": type(exc).__name__, "message": str(exc)[:2000],
                           "traceback": traceback.format_exc()[-4000:]})
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
