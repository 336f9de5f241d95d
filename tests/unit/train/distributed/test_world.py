"""How many processes a stage runs: decided before any work, errors naming the key."""
import pytest

from pillsnap.config import ConfigError, DistributedConfig
from pillsnap.train.distributed.launch import torchrun_command
from pillsnap.train.distributed.world import launch_spec


def test_one_process_is_the_in_process_path_and_auto_takes_every_gpu():
    assert not launch_spec(DistributedConfig(), gpus=0).distributed
    assert launch_spec(DistributedConfig(nproc_per_node="auto"), gpus=0).world_size == 1
    spec = launch_spec(DistributedConfig(nproc_per_node="auto", nnodes=2), gpus=4)
    assert (spec.world_size, spec.backend) == (8, "nccl")
    assert launch_spec(DistributedConfig(nproc_per_node="2"), gpus=0).backend == "gloo"


def test_what_this_machine_cannot_do_is_refused_by_its_key():
    with pytest.raises(ConfigError, match=r"nproc_per_node=4: 4 processes but 2 visible GPU"):
        launch_spec(DistributedConfig(nproc_per_node="4"), gpus=2)
    with pytest.raises(ConfigError, match=r"backend=nccl needs CUDA"):
        launch_spec(DistributedConfig(nproc_per_node="2", backend="nccl"), gpus=0)


def test_one_node_rendezvous_is_standalone_and_several_meet_at_node_0(tmp_path):
    one = torchrun_command(launch_spec(DistributedConfig(nproc_per_node="2"), gpus=0), tmp_path / "job.json")
    assert "--standalone" in one and "--nproc_per_node=2" in one and one[-2:] == [
        "pillsnap.train.distributed.worker", str(tmp_path / "job.json")]
    several = torchrun_command(launch_spec(DistributedConfig(nproc_per_node="8", nnodes=2, node_rank=1,
                                                             rdzv_endpoint="node0:29500"), gpus=8),
                               tmp_path / "job.json")
    assert "--rdzv_endpoint=node0:29500" in several and "--node_rank=1" in several and "--standalone" not in several
    assert "--rdzv_backend=static" in several  # c10d would ignore --node_rank: rank 0 must be on node 0


def test_synchronised_batchnorm_needs_gpu_ranks():
    with pytest.raises(ConfigError, match=r"sync_batchnorm=true: torch's SyncBatchNorm runs on CUDA"):
        launch_spec(DistributedConfig(nproc_per_node="2", sync_batchnorm=True), gpus=0)
    assert launch_spec(DistributedConfig(nproc_per_node="2", sync_batchnorm=True), gpus=2).distributed
    assert not launch_spec(DistributedConfig(sync_batchnorm=True), gpus=0).distributed  # one process: nothing to sync


def _rank(rank: int, port: int, timeout_minutes: float, out) -> None:
    import os
    import time

    import torch

    from pillsnap.train.distributed.world import join_world

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    comm = join_world("gloo", rank, 2, 0, timeout_minutes)
    if rank == 1:  # joined, then never reaches the collective: a rank busy alone, or a node that died
        time.sleep(30)
        return
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        out.put(("returned", time.monotonic() - start))
    except Exception as e:  # the group fails: what the training task then reports
        out.put((type(e).__name__, time.monotonic() - start))
    assert comm.rank == 0


def test_a_rank_that_never_reaches_the_collective_fails_the_group_after_the_configured_timeout():
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(r, port, 0.05, out), daemon=True) for r in (0, 1)]  # 3 s
    for p in ranks:
        p.start()
    outcome, waited = out.get(timeout=60)
    for p in ranks:
        p.kill()
    assert outcome != "returned" and 2.5 < waited < 20


def test_a_node_joins_only_an_attempt_that_has_not_ended_and_only_node_0s_shape(tmp_path, make_config):
    from pillsnap.core.jsonio import write_json_atomic
    from pillsnap.train.distributed.node import NoAttempt, next_attempt, node_spec

    with pytest.raises(NoAttempt, match="no training attempt started in"):
        next_attempt(tmp_path, set(), wait_s=0)
    job = {"attempt": "a1", "nnodes": 2, "rdzv_endpoint": "127.0.0.1:29500", "backend": "gloo"}
    write_json_atomic(tmp_path / "job.json", job)
    assert next_attempt(tmp_path, set(), wait_s=0) == (tmp_path / "job.json", "a1")
    with pytest.raises(NoAttempt):
        next_attempt(tmp_path, {"a1"}, wait_s=0)  # joined already (and failed): wait for node 0's retry
    write_json_atomic(tmp_path / "ended.json", {"attempt": "a1", "code": 1})
    with pytest.raises(NoAttempt):
        next_attempt(tmp_path, set(), wait_s=0)  # over: a node started later does not join it
    cfg = make_config(tmp_path, "train.distributed.nnodes=2")
    with pytest.raises(ConfigError, match="node_rank=0 is the node that runs the stage"):
        node_spec(cfg, job)
    cfg.train.distributed.node_rank = 1
    assert node_spec(cfg, job).node_rank == 1 and node_spec(cfg, job).backend == "gloo"
    with pytest.raises(ConfigError, match=r"nnodes=2 on this node, but node 0's attempt uses 3"):
        node_spec(cfg, {**job, "nnodes": 3})
