"""What every task shares: config (de)serialisation, library logs in the run logs, progress artifacts,
result storage under the experiment directory, and the code version that goes into cache keys."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE
from prefect.context import FlowRunContext

import pillsnap
from pillsnap import progress as lib_progress
from pillsnap.config import PillSnapConfig, from_dict
from pillsnap.core.identity import ArtifactChanged

PACKAGE_DIR = Path(pillsnap.__file__).parent


def use_forkserver_workers() -> None:
    """DataLoader workers forked from a Prefect run process die at start (SystemExit(1) inherited from the
    run's state); workers started by a clean fork server work. Applies to our loaders and ultralytics'."""
    if multiprocessing.get_start_method(allow_none=True) != "forkserver":
        multiprocessing.set_start_method("forkserver", force=True)


def cfg_of(config: Dict) -> PillSnapConfig:
    return from_dict(config)


def result_storage(config: Dict) -> Path:
    path = Path(config["paths"]["exp_dir"]).resolve() / ".prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    return path


# A flow run's task result, kept for that run only (its id, the task's code and its inputs): a run suspended for a
# review is started again from the top and must not evaluate, export or probe the API a second time.
KEPT_FOR_THE_RUN = RUN_ID + TASK_SOURCE + INPUTS


def review_pause_key(stage: int) -> str:
    return f"stage-{stage}-review"


def resumed_after_review() -> bool:
    """This flow run was suspended for its review and started again from the top by the answer (the server keeps
    the keys of the suspensions it came back from)."""
    run = FlowRunContext.get()
    keys = run.flow_run.empirical_policy.pause_keys if run and run.flow_run else ()
    return any(key.startswith("stage-") and key.endswith("-review") for key in keys)  # review_pause_key's form


def kept_for_the_run(task, storage: Path):
    return task.with_options(cache_policy=KEPT_FOR_THE_RUN, persist_result=True, result_storage=storage)


def fresh_result(task, changed: Callable[[Any], Optional[str]], *args, **options) -> Tuple[Any, str]:
    """(result, state name) of `task(*args)` with its cache, except that a result whose files on disk are no longer
    the ones it recorded (`changed(result)` says why, e.g. another run rebuilt them) is a miss: computed again. In a
    run started again after its review was suspended, the review judged those files: it is an error naming them."""
    state = task.with_options(**options)(*args, return_state=True)
    result = state.result()
    why = changed(result)
    if why and resumed_after_review():
        raise ArtifactChanged(f"{task.name}: this run's result is not what is on disk any more ({why}): another run "
                              "of the experiment changed it while this run waited for its review; the review was of "
                              "other files, so nothing is decided: run the stage again")
    if why:
        get_run_logger().warning("%s: its cached result no longer describes the files on disk (%s); computing it "
                                 "again", task.name, why)
        state = task.with_options(**options, refresh_cache=True)(*args, return_state=True)
        result = state.result()
    return result, state.name


def run_name() -> str:
    """This flow run's id (what its files are kept under, e.g. config.resolved.<run>.yaml), or a UTC time stamp
    outside a flow run."""
    from prefect.runtime import flow_run

    return flow_run.get_id() or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the library's source: a code change invalidates cached training results."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


class _RunLogHandler(logging.Handler):
    def __init__(self, run_logger):
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, "%s: %s", record.name, record.getMessage())


@contextmanager
def library_logs_in_run() -> Iterator[None]:
    """The library never imports prefect; its logger is forwarded into this task's run logs here."""
    handler = _RunLogHandler(get_run_logger())
    lib = logging.getLogger("pillsnap")
    lib.addHandler(handler)
    old_level, old_propagate = lib.level, lib.propagate
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    lib.propagate = False  # the run logger already prints to the console: no second copy via the root logger
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(old_level)
        lib.propagate = old_propagate


@contextmanager
def progress_artifact(key: str, description: str, min_interval_s: float = 5.0) -> Iterator[None]:
    """A Prefect progress artifact that follows the library's progress bars (throttled)."""
    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    last: Dict[str, float] = {"t": 0.0}

    def listener(desc: str, done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        if not total or (now - last["t"] < min_interval_s and done < total):
            return
        last["t"] = now
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / total,
                                 description=f"{description}: {desc} {done}/{total}")

    lib_progress.add_listener(listener)
    try:
        yield
    finally:
        lib_progress.remove_listener(listener)
        update_progress_artifact(artifact_id=artifact_id, progress=100.0, description=f"{description}: done")
