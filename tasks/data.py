"""Data tasks: synthesize, import, validate (cached on the manifest hash), build the stage subset (cached)."""
from __future__ import annotations

from typing import Dict

from prefect import task

from pillsnap.config import config_fingerprint
from pillsnap.data.manifest import manifest_hash, read_manifest
from pillsnap.data.prepare import (VALIDATION_KEYS, manifest_path, run_import, run_subset, run_validation, source_root,
                                   subset_keys)
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


def current_manifest_hash(config: Dict) -> str:
    return manifest_hash(read_manifest(manifest_path(cfg_of(config))))


def _validation_key(context, parameters) -> str:
    return f"validate-{parameters['manifest_hash']}-{config_fingerprint(parameters['config'], VALIDATION_KEYS)}"


@task(name="validate-data", cache_key_fn=_validation_key, persist_result=True)
def validate_task(config: Dict, manifest_hash: str) -> Dict:
    with library_logs_in_run():
        cfg = cfg_of(config)
        return run_validation(cfg, show_progress=cfg.logging.progress_bar)


def _subset_key(context, parameters) -> str:
    stage = parameters["stage"]
    return (f"subset-{parameters['manifest_hash']}-{stage}-"
            f"{config_fingerprint(parameters['config'], subset_keys(stage))}")


@task(name="build-stage-subset", cache_key_fn=_subset_key, persist_result=True)
def subset_task(config: Dict, stage: int, manifest_hash: str) -> Dict:
    with library_logs_in_run():
        return run_subset(cfg_of(config), stage)
