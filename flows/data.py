"""Data preparation: synthesize (synthetic source only) -> import -> validate. Import (the AIHub label files) and
validation (with the first pixel-cache fill: one decode per photo) run in shards on the configured task runner."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from prefect import flow
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from flows.config import resolve
from flows.runners import shard_task_runner, shard_workers
from pillsnap.data.label_shards import label_result
from pillsnap.data.prepare import shard_results_dir
from pillsnap.data.shards import files_identity, shard_finished
from tasks.common import cfg_of, result_storage
from tasks.data import (current_manifest_hash, import_from_shards_task, import_shard_task, import_task,
                        plan_import_task, plan_validation_task, synthesize_task, validate_shard_task, validate_task,
                        validation_key)


class ShardsFailed(RuntimeError):
    """Some shards failed after every other shard finished; the message names each one's file and error."""


def _run_shards(task, config: Dict, shards: List, finished: Callable[[Any], bool], *args) -> List[Dict]:
    """Every shard on the flow's task runner; all of them finish (or fail) before a failure is raised. Prefect's
    kept result is used only while the shard's files are on disk (else it would point at files that are gone).
    A result Prefect kept from an earlier run says what THAT run computed: nothing was computed this time."""
    storage = result_storage(config)
    futures = [task.with_options(result_storage=storage, refresh_cache=not finished(shard)).submit(shard, *args)
               for shard in shards]
    states = [f.wait() or f.state for f in futures]
    failed = [s for s in states if not s.is_completed()]
    if failed:
        raise ShardsFailed(f"{len(failed)} of {len(states)} shards of {task.name} failed (the others finished and "
                           "are kept; a re-run redoes only these):\n  - "
                           + "\n  - ".join(str(s.message) for s in failed))
    return [{**summary, "computed": summary["computed"] and s.name != "Cached"}
            for s, summary in ((s, s.result()) for s in states)]


def _import(config: Dict) -> Dict:
    if config["data"]["source"] == "csv":
        return import_task(config)  # one CSV file: nothing to shard
    results_dir = shard_results_dir(cfg_of(config)).resolve()
    summaries = _run_shards(import_shard_task, config, plan_import_task(config),
                            lambda shard: label_result(shard, results_dir).is_file(), str(results_dir))
    imported = import_from_shards_task(config, summaries)
    return {**imported, "shards": {"total": len(summaries), "computed": sum(s["computed"] for s in summaries)}}


def _cached_validation(config: Dict, manifest_hash: str) -> Tuple[Optional[Dict], Tuple]:
    """(the validation of this manifest, these settings and these files as they are now, when the result store has
    it, else None; the shard plan). Planning stamps every photo's file: a photo truncated or replaced since it was
    validated is a miss."""
    storage = result_storage(config)
    plan = plan_validation_task(config)
    files = files_identity(plan[0])
    if not ResultStore(result_storage=LocalFileSystem(basepath=str(storage))).exists(
            validation_key(config, manifest_hash, files)):
        return None, plan
    return validate_task.with_options(result_storage=storage)(config, manifest_hash, files, [], ""), plan  # a hit


def _validate(config: Dict, manifest_hash: str) -> Dict:
    cached, (shards, settings, cache_note) = _cached_validation(config, manifest_hash)
    if cached is not None:
        return cached
    cfg = cfg_of(config)
    results_dir = shard_results_dir(cfg).resolve()
    summaries = _run_shards(validate_shard_task, config, shards,
                            lambda shard: shard_finished(shard, settings, results_dir), settings, str(results_dir),
                            shard_workers(cfg))
    return validate_task.with_options(result_storage=result_storage(config))(
        config, manifest_hash, files_identity(shards), summaries, cache_note)


@flow(name="pillsnap-prepare")
def prepare_flow(config: Dict, with_import: bool = True) -> Dict:
    """The shards of import (when asked) and validation, on the task runner this subflow was given."""
    imported = _import(config) if with_import else None
    return {"imported": imported, "validation": _validate(config, current_manifest_hash(config))}


def validate_data(config: Dict, manifest_hash: str) -> Dict:
    """The validation of this manifest, settings and files: from the result store when it was done, else in shards
    on the configured task runner (which plans them again: a plan of the release is not passed as a parameter)."""
    cached, _ = _cached_validation(config, manifest_hash)
    if cached is not None:
        return cached
    runner = shard_task_runner(cfg_of(config))
    return prepare_flow.with_options(task_runner=runner)(config, with_import=False)["validation"]


@flow(name="pillsnap-data")
def data_flow(profile: Optional[str] = None, overrides: Optional[List[str]] = None,
              config_path: Optional[str] = None) -> Dict:
    config = resolve(config_path, profile, overrides)
    synthesized = synthesize_task(config) if config["data"]["source"] == "synthetic" else None
    prepared = prepare_flow.with_options(task_runner=shard_task_runner(cfg_of(config)))(config)
    return {"synthesized": synthesized, **prepared}
