"""The process environment, read in ONE place: the entry points (the CLI, flow entry) call these; the library
below them never reads environment variables for its settings, it receives a PillSnapConfig.

- PILLSNAP_INJECT_OOM="3,7" becomes the override train.oom.inject_at_steps=[3,7] (an OOM drill on a running
  deployment without editing its config);
- PILLSNAP_NPROC_PER_NODE="auto" (or a number) becomes train.distributed.nproc_per_node: a Kubernetes pod that
  requests N GPUs trains on all of them (deployments/kubernetes.yaml);
- PILLSNAP_API_KEYS="k1,k2": API keys for `pillsnap serve` (beside serve.api_keys_file), kept out of configs;
- RANK, WORLD_SIZE, LOCAL_RANK: a training process's place among those torchrun started (distributed/worker.py);
- YOLO_CONFIG_DIR defaults to <exp_dir>/ultralytics_settings (ultralytics fixes its settings folder at import);
- PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True (less fragmentation, fewer OOMs; read by CUDA at
  first use). A value the user set always wins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, MutableMapping, Tuple

INJECT_ENV_VAR = "PILLSNAP_INJECT_OOM"
NPROC_ENV_VAR = "PILLSNAP_NPROC_PER_NODE"
API_KEYS_ENV_VAR = "PILLSNAP_API_KEYS"
ALLOC_CONF_ENV_VAR = "PYTORCH_CUDA_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def overrides_from_environment(env: Mapping[str, str] = os.environ) -> List[str]:
    out = []
    text = env.get(INJECT_ENV_VAR, "").strip()
    if text:
        steps = [part.strip() for part in text.split(",") if part.strip()]
        bad = [s for s in steps if not s.isdigit()]
        if bad:
            raise ValueError(f"{INJECT_ENV_VAR}={text!r}: expected comma-separated step numbers like '3,7'")
        out.append(f"train.oom.inject_at_steps=[{','.join(steps)}]")
    nproc = env.get(NPROC_ENV_VAR, "").strip()
    if nproc:
        out.append(f"train.distributed.nproc_per_node={nproc}")  # the config check names a bad value
    return out


def torchrun_rank(env: Mapping[str, str] = os.environ) -> Tuple[int, int, int]:
    """(rank, world size, local rank) of a process torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK)."""
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))


def api_keys_from_environment(env: Mapping[str, str] = os.environ) -> List[str]:
    return [k.strip() for k in env.get(API_KEYS_ENV_VAR, "").split(",") if k.strip()]


def prepare_process(exp_dir: Path, env: MutableMapping[str, str] = os.environ) -> None:
    if not env.get("YOLO_CONFIG_DIR"):
        settings = Path(exp_dir).resolve() / "ultralytics_settings"
        settings.mkdir(parents=True, exist_ok=True)
        env["YOLO_CONFIG_DIR"] = str(settings)
    env.setdefault(ALLOC_CONF_ENV_VAR, DEFAULT_ALLOC_CONF)
