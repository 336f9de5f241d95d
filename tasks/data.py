"""Data tasks: synthesize, import, validate (cached on the manifest hash), build the stage subset (cached)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Dict

from prefect import task

from pillsnap.data.manifest import manifest_hash, read_manifest
from pillsnap.data.prepare import manifest_path, run_import, run_subset, run_validation, source_root
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
        return run_import(cfg_of(config), show_progress=cfg_of(config).logging.progress_bar)


def current_manifest_hash(config: Dict) -> str:
    return manifest_hash(read_manifest(manifest_path(cfg_of(config))))


def _validation_key(context, parameters) -> str:
    rules = json.dumps(parameters["config"]["data"]["validation"], sort_keys=True)
    return f"validate-{parameters['manifest_hash']}-{hashlib.sha256(rules.encode()).hexdigest()[:8]}"


@task(name="validate-data", cache_key_fn=_validation_key, persist_result=True)
def validate_task(config: Dict, manifest_hash: str) -> Dict:
    with library_logs_in_run():
        return run_validation(cfg_of(config), show_progress=cfg_of(config).logging.progress_bar)


def _subset_key(context, parameters) -> str:
    """Everything the subset depends on: the manifest, the stage's row, the seed, the val fraction."""
    cfg = cfg_of(parameters["config"])
    stage = parameters["stage"]
    spec = json.dumps([asdict(cfg.stage(stage)), cfg.data.seed, cfg.data.val_fraction], sort_keys=True)
    return f"subset-{parameters['manifest_hash']}-{stage}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


@task(name="build-stage-subset", cache_key_fn=_subset_key, persist_result=True)
def subset_task(config: Dict, stage: int, manifest_hash: str) -> Dict:
    with library_logs_in_run():
        return run_subset(cfg_of(config), stage)
