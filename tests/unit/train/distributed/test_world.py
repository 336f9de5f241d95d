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


def test_synchronised_batchnorm_needs_gpu_ranks():
    with pytest.raises(ConfigError, match=r"sync_batchnorm=true: torch's SyncBatchNorm runs on CUDA"):
        launch_spec(DistributedConfig(nproc_per_node="2", sync_batchnorm=True), gpus=0)
    assert launch_spec(DistributedConfig(nproc_per_node="2", sync_batchnorm=True), gpus=2).distributed
    assert not launch_spec(DistributedConfig(sync_batchnorm=True), gpus=0).distributed  # one process: nothing to sync
