"""Data tasks: synthesize, import, validate in shards (each cached on its photos; the report on the manifest hash),
build the stage subset (cached)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from prefect import get_run_logger, task

from pillsnap.config import config_fingerprint
from pillsnap.data.manifest import manifest_hash, read_manifest
from pillsnap.data.label_shards import LabelShard, run_label_shard
from pillsnap.data.prepare import (PREPARE_KEYS, finish_validation, import_from_shards, manifest_path, plan_import,
                                   plan_validation, run_import, run_subset, source_root, subset_keys)
from pillsnap.data.shards import Shard, ShardSettings, run_shard
from pillsnap.data.synth import synthesize
from tasks.common import cfg_of, library_logs_in_run


@task(name="synthesize-data")
def synthesize_task(config: Dict) -> Dict:
    cfg = cfg_of(config)
    root = source_root(cfg)
    if (root / "train").is_dir():
        return {"root": str(root), "skipped": "already present"}
    with library_logs_in_run():
        counts = synthesize(cfg.synth, root, show_progress=cfg.logging.progress_bar)
    return {"root": str(root), **counts}


@task(name="import-data")
def import_task(config: Dict) -> Dict:
    with library_logs_in_run():
        cfg = cfg_of(config)
        return run_import(cfg, show_progress=cfg.logging.progress_bar)


@task(name="plan-import-shards")
def plan_import_task(config: Dict) -> List[LabelShard]:
    return plan_import(cfg_of(config))


def _label_shard_key(context, parameters) -> str:
    return f"import-{parameters['shard'].key}"


@task(name="import-shard", task_run_name="import-shard-{shard.index}", cache_key_fn=_label_shard_key,
      persist_result=True)
def import_shard_task(shard: LabelShard, results_dir: str) -> Dict:
    with library_logs_in_run():
        return run_label_shard(shard, Path(results_dir))


@task(name="import-data-from-shards")
def import_from_shards_task(config: Dict, shards: List[Dict]) -> Dict:
    """The manifest, split and class map from every label shard, merged in label-file order."""
    with library_logs_in_run():
        return import_from_shards(cfg_of(config), shards)


def current_manifest_hash(config: Dict) -> str:
    return manifest_hash(read_manifest(manifest_path(cfg_of(config))))


def validation_key(config: Dict, manifest_hash: str, files: str) -> str:
    """The manifest, the settings and the photos' files as they are now (`files`: shards.files_identity)."""
    return f"validate-{manifest_hash}-{config_fingerprint(config, PREPARE_KEYS)}-{files}"


def _validation_key(context, parameters) -> str:
    return validation_key(parameters["config"], parameters["manifest_hash"], parameters["files"])


@task(name="plan-validation-shards")
def plan_validation_task(config: Dict) -> Tuple[List[Shard], ShardSettings, str]:
    with library_logs_in_run():
        shards, settings, cache_note = plan_validation(cfg_of(config))
        get_run_logger().info("%d photos in %d shards; pixel cache %s", sum(len(s.photos) for s in shards),
                              len(shards), cache_note)
        return shards, settings, cache_note


def _shard_key(context, parameters) -> str:
    return f"validate-shard-{parameters['shard'].key}"


@task(name="validate-shard", task_run_name="validate-shard-{shard.index}", cache_key_fn=_shard_key,
      persist_result=True)
def validate_shard_task(shard: Shard, settings: ShardSettings, results_dir: str, workers: int) -> Dict:
    """One shard's fused inspection (read, hash, decode, check, cache rows). Its result and rows are on disk too:
    a shard finished by a run whose Prefect results were lost is still not redone."""
    with library_logs_in_run():
        return run_shard(shard, settings, Path(results_dir), workers)


@task(name="validate-data", cache_key_fn=_validation_key, persist_result=True)
def validate_task(config: Dict, manifest_hash: str, files: str, shards: List[Dict], cache_note: str) -> Dict:
    """The report from the shards' checks (cached on the manifest, the settings and the files' stamps); raises on a
    fatal finding."""
    with library_logs_in_run():
        return finish_validation(cfg_of(config), shards, cache_note)


def _subset_key(context, parameters) -> str:
    stage = parameters["stage"]
    return (f"subset-{parameters['manifest_hash']}-{stage}-"
            f"{config_fingerprint(parameters['config'], subset_keys(stage))}")


@task(name="build-stage-subset", cache_key_fn=_subset_key, persist_result=True)
def subset_task(config: Dict, stage: int, manifest_hash: str) -> Dict:
    with library_logs_in_run():
        return run_subset(cfg_of(config), stage)
