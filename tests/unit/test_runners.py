"""The task runner of data preparation's shards, from orchestration.*: what each setting gives, and the error
known before any work (an external Dask cluster cannot reach an embedded Prefect server)."""
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import shard_task_runner, shard_workers
from pillsnap.config import ConfigError, load_config


def test_local_runs_one_shard_at_a_time_over_every_core():
    cfg = load_config(overrides=["data.validation.workers=0"])
    runner = shard_task_runner(cfg)
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 1 and shard_workers(cfg) >= 1


def test_a_dask_worker_inspects_its_shard_in_its_own_process():
    from prefect_dask import DaskTaskRunner

    cfg = load_config(overrides=["orchestration.task_runner=dask", "orchestration.dask_address=tcp://sched:8786"])
    assert shard_workers(cfg) == 1
    with temporary_settings({PREFECT_API_URL: "http://prefect.example:4200/api"}):
        runner = shard_task_runner(cfg)
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://sched:8786"


def test_an_external_cluster_without_a_reachable_prefect_server_stops_before_work():
    cfg = load_config(overrides=["orchestration.task_runner=dask", "orchestration.dask_address=tcp://sched:8786"])
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigError, match=r"orchestration\.dask_address=tcp://sched:8786: .*PREFECT_API_URL"):
        shard_task_runner(cfg)
