"""`pillsnap serve`: a trained stage's models behind the HTTP API, on uvicorn."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Set, Tuple

from pillsnap.config import PillSnapConfig
from pillsnap.core.devices import device_name, serving_device
from pillsnap.serve.batching import BatchingEngine

log = logging.getLogger(__name__)


def read_api_keys(cfg: PillSnapConfig, extra: Iterable[str] = ()) -> Set[str]:
    """Keys from serve.api_keys_file (one a line, # comments) plus those the entry point read elsewhere."""
    keys = {k.strip() for k in extra if k.strip()}
    if cfg.serve.api_keys_file:
        path = Path(cfg.serve.api_keys_file)
        if not path.is_file():
            raise FileNotFoundError(f"serve.api_keys_file: no such file {path}")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    return keys


def stage_loader(cfg: PillSnapConfig, stage: Optional[int], engine: Optional[str]):
    """A loader for the app: the stage's Predictor (micro-batching classifier) and the facts /ready reports."""
    def load() -> Tuple[Any, Dict[str, Any]]:
        from pillsnap.infer.predict import load_predictor

        predictor = load_predictor(cfg, stage, engine)
        if cfg.serve.micro_batch:
            predictor.classifier = BatchingEngine(predictor.classifier, cfg.serve.micro_batch_max)
        identity = predictor.identity  # the same in /ready and in every answer
        facts = {"stage": identity["stage"], "engine": identity["engine"], "device": device_name(serving_device(cfg)),
                 "runs_on": predictor.classifier.runs_on,
                 "num_classes": len(predictor.labels), "class_map_hash": identity["class_map_hash"],
                 "model_files": {n: f["path"] for n, f in identity["files"].items()}, "model": identity,
                 "detector": predictor.has_detector, "default_mode": predictor.default_mode,
                 "micro_batch": cfg.serve.micro_batch}
        return predictor, facts
    return load


def serve_stage(cfg: PillSnapConfig, stage: Optional[int], engine: Optional[str], host: str, port: int,
                api_keys: Set[str]) -> None:
    import uvicorn

    from pillsnap.serve.app import create_app

    app = create_app(stage_loader(cfg, stage, engine), cfg.serve, api_keys)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve: listening on %s, beyond this machine; keep API keys on", host)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
