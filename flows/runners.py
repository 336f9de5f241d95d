"""The task runner that data preparation's shards are mapped on (orchestration.task_runner)."""
from __future__ import annotations

import os

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pillsnap.config import ConfigError, PillSnapConfig
from pillsnap.data.prepare import validation_workers


def shard_task_runner(cfg: PillSnapConfig) -> TaskRunner:
    """local: one shard at a time on this machine, each over a process pool of every core. dask: one shard per
    worker process, on the scheduler at orchestration.dask_address or on a local cluster of dask_workers."""
    o = cfg.orchestration
    if o.task_runner == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if o.dask_address:
        if not PREFECT_API_URL.value():
            raise ConfigError(f"orchestration.dask_address={o.dask_address}: the Dask workers report their task runs "
                              "to the Prefect API, and this run uses an embedded server only this process can reach; "
                              "start one they can reach (`make server`) and set PREFECT_API_URL to it")
        return DaskTaskRunner(address=o.dask_address)
    # The workers of a local cluster report to this run's server, even an embedded one (else each starts its own).
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers or os.cpu_count() or 1, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "env": {"PREFECT_API_URL": api_url}})


def shard_workers(cfg: PillSnapConfig) -> int:
    """Processes inside one shard: a Dask worker is a daemon process and may not start a pool of its own."""
    return 1 if cfg.orchestration.task_runner == "dask" else validation_workers(cfg)
