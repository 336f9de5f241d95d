"""Training on 2 processes (gloo on the CPU, torchrun as a child, tiny models) against 1 process at the same global
batch: the same samples, schedule and steps, per-step losses within a tolerance fixed in advance (also through an
OOM on rank 1, which both ranks answer with the same step: fp16 autocast from there on), an exact resume after the
process group was killed, and no rank left alive after a cancel.

The 1-process reference trains micro-batches of 4 with accumulation 2 (a batch plan): the same partition of every
window into micro-batches as 2 ranks x 4 with accumulation 1, so BatchNorm sees the same batches; what differs is
only where the gradients are summed (exactly: the weights are powers of 2 and two operands commute)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pillsnap.config import to_dict
from pillsnap.core import layout
from pillsnap.core.checkpoints import load_checkpoint
from pillsnap.data.prepare import run_import, run_subset
from pillsnap.data.subsets import read_subset
from pillsnap.train import train_stage
from pillsnap.train.distributed.launch import DistributedRunFailed, run_training_processes
from pillsnap.train.distributed.world import launch_spec

pytestmark = pytest.mark.slow
# Relative, per step. Measured here: 0 (bitwise equal) at one thread per process, which the unit tests' fixture and
# torchrun both give; the margin covers reductions another platform may order differently.
LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6
SIZES = ("train.classification.epochs=2", "train.detection.epochs=1", "train.classification.batch_size=4",
         "train.detection.batch_size=2", "train.grad_accum_steps=1", "train.deterministic=true",
         "detection.include_single_images=true", "train.recovery_every_steps=4", "train.oom.cooldown_sec=0")


@pytest.fixture()
def stage(make_config, tiny_aihub):
    """make(tmp, *overrides): an experiment over the session's tiny synthetic set, imported and subset."""
    def make(tmp: Path, *overrides: str):
        cfg = make_config(tmp, f"paths.data_root={tiny_aihub}", f"synth.out_dir={tiny_aihub}", *SIZES, *overrides)
        run_import(cfg, show_progress=False)
        run_subset(cfg, 1)
        return cfg
    return make


def _two_ranks(cfg, stage_dir: Path):
    spec = launch_spec(cfg.train.distributed)
    assert spec.world_size == 2 and spec.backend == "gloo"
    return run_training_processes(to_dict(cfg), 1, stage_dir, None, None, spec, timeout_s=900)


def _one_process_at_the_same_global_batch(cfg, stage_dir: Path):
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path

    plans = {"classifier": {"batch": {"batch_size": 4, "grad_accum": 2, "probed": False}},
             "detector": {"batch": {"batch_size": 2, "grad_accum": 2, "probed": False}}}
    subset, _ = read_subset(cfg.exp_dir, 1)
    return train_stage(cfg, subset, ClassMap.load(class_map_path(cfg)), 1, stage_dir, plans=plans,
                       show_progress=False)


def _step_losses(tb_dir: Path):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def _weights(stage_dir: Path):
    payload = load_checkpoint(stage_dir / "checkpoints" / "last.pt")
    return {"classifier": payload["model"], "detector": payload["units"]["detector"]["model"]}


def _assert_like_one_process(results, reference, two: Path, one: Path) -> None:
    """The same steps and epochs, per-step losses within LOSS_TOLERANCE, final weights within WEIGHT_TOLERANCE."""
    for model, folder in (("classifier", "tb"), ("detector", "detector/tb")):
        assert results[model]["global_step"] == reference[model].global_step >= 8, model
        assert results[model]["epochs_completed"] == reference[model].epochs_completed
        ours, theirs = _step_losses(two / folder), _step_losses(one / folder)
        assert len(ours) == len(theirs) == reference[model].global_step
        worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(ours, theirs))
        assert worst <= LOSS_TOLERANCE, f"{model}: per-step losses differ by up to {worst:.2e}"
    assert results["classifier"]["global_step"] + results["detector"]["global_step"] >= 20
    theirs = _weights(one)
    for model, weights in _weights(two).items():
        for key, value in weights.items():
            # BatchNorm running statistics: one process folds its 2 micro-batches in one after the other (momentum
            # twice), 2 ranks fold one each and average; the weights they normalise with in training are the same.
            if value.dtype.is_floating_point and "running_" not in key:
                assert torch.allclose(value, theirs[model][key], rtol=WEIGHT_TOLERANCE, atol=1e-5), f"{model} {key}"


def test_two_ranks_train_like_one_process_with_the_same_global_batch(stage, tmp_path):
    one = stage(tmp_path / "one", "train.strategy=sequential")
    reference = _one_process_at_the_same_global_batch(one, tmp_path / "one/stage_1")
    two = stage(tmp_path / "two", "train.strategy=sequential", "train.distributed.nproc_per_node=2")
    results = _two_ranks(two, tmp_path / "two/stage_1")
    _assert_like_one_process(results, reference, tmp_path / "two/stage_1", tmp_path / "one/stage_1")
    # Issue 28 point 8: what a verdict reads of a run on several processes: the world size, each rank's throughput
    # and the largest rank's memory (rank 0 alone hid a leak elsewhere).
    for model in ("classifier", "detector"):
        assert results[model]["world_size"] == 2
        for row in results[model]["epochs"]:
            assert [r["rank"] for r in row["ranks"]] == [0, 1]
            assert row["host_private_mb"] == max(r["host_private_mb"] for r in row["ranks"])
            assert row["ranks"][0]["throughput_img_s"] == pytest.approx(row["throughput_img_s"] / 2)


def test_interleaved_with_an_oom_on_rank_1_trains_like_one_process_and_a_killed_group_resumes_exactly(
        stage, tmp_path, caplog):
    """The shipped strategy. Rank 1 runs out of memory at step 3: both ranks take S1 together, as one process that
    runs out of memory at step 3 does. Then the process group is killed mid-run and the run is started again."""
    oom = ("train.strategy=interleaved", "train.oom.inject_at_steps=[3]")
    one = stage(tmp_path / "one", *oom)
    reference = _one_process_at_the_same_global_batch(one, tmp_path / "one/stage_1")
    ranks = (*oom, "train.distributed.nproc_per_node=2", "train.oom.inject_rank=1")
    with caplog.at_level("INFO", logger="pillsnap.train.distributed"):
        uninterrupted = _two_ranks(stage(tmp_path / "a", *ranks), tmp_path / "a/stage_1")
    lines = [r.getMessage() for r in caplog.records]
    for rank_prefix in ("", "[rank 1] "):  # rank 1 ran out of memory; rank 0 took the same step with it
        assert any(line.startswith(rank_prefix + "pillsnap.train.services.oom_state_machine: OOM recovery S1")
                   for line in lines), rank_prefix
    assert [e["action"] for e in uninterrupted["classifier"]["oom_events"]] == ["amp_fp16"]
    assert [e["action"] for e in reference["classifier"].oom_events] == ["amp_fp16"]
    _assert_like_one_process(uninterrupted, reference, tmp_path / "a/stage_1", tmp_path / "one/stage_1")

    crash = stage(tmp_path / "b", *ranks, "train.crash_at_step=9")
    with pytest.raises(DistributedRunFailed, match="SimulatedCrash") as crashed:
        _two_ranks(crash, tmp_path / "b/stage_1")
    assert crashed.value.exception_type == "SimulatedCrash"  # a retry can help: the task retries it
    resumed = _two_ranks(crash, tmp_path / "b/stage_1")
    assert resumed["classifier"]["resumed_from_step"] == 8
    theirs = _weights(tmp_path / "a/stage_1")
    for model, weights in _weights(tmp_path / "b/stage_1").items():
        for key, value in weights.items():
            assert torch.equal(value, theirs[model][key]), f"{model} {key}"


# The two ways a cancelled flow run's process ends: a runner's cancel is SIGTERM, which Prefect's engine raises as
# an exception in the flow's thread (emulated by a handler that raises): the launcher's `finally` kills the group; a
# SIGKILL (the runner's escalation) runs no clean-up: the child's parent-death signal ends torchrun, which ends the
# ranks. (The two are not told apart here: either alone ends the ranks within milliseconds.)
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_killing_the_launching_process_leaves_no_rank_alive(stage, tmp_path, how):
    cfg = stage(tmp_path, "train.distributed.nproc_per_node=2", "train.classification.epochs=50")
    script = tmp_path / "launch.py"
    script.write_text(
        "import json, signal, sys\nfrom pathlib import Path\nfrom pillsnap.config import from_dict\n"
        "from pillsnap.train.distributed.launch import run_training_processes\n"
        "from pillsnap.train.distributed.world import launch_spec\n"
        "def stop(*_):\n    raise SystemExit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "config = json.loads(Path(sys.argv[1]).read_text())\n"
        "run_training_processes(config, 1, Path(sys.argv[2]), None, None,"
        " launch_spec(from_dict(config).train.distributed))\n")
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg), default=str))
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path / "config.json"),
                                 str(tmp_path / "stage_1")], cwd=Path(__file__).resolve().parents[4],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, children, ranks = time.monotonic() + 120, [], []
    while time.monotonic() < deadline and len(ranks) < 2:
        time.sleep(1)
        children = psutil.Process(launcher.pid).children(recursive=True)  # torchrun's agent and the ranks
        ranks = [p for p in children if "pillsnap.train.distributed.worker" in " ".join(p.cmdline())
                 and "torch.distributed.run" not in " ".join(p.cmdline())]
    assert len(ranks) == 2, "the ranks did not start"
    os.kill(launcher.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    code = launcher.wait(timeout=60)
    assert code == (143 if how == "sigterm" else -signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"still alive after the launcher died: {[p.pid for p in alive]}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_1(cfg, outcome: dict, **kwargs):
    """`pillsnap train-node` on node 1 (in a thread: it is torchrun's parent, as on a machine of its own)."""
    import copy
    import threading

    from pillsnap.train.distributed.node import join_stage_training

    node = copy.deepcopy(cfg)
    node.train.distributed.node_rank = 1

    def run():
        try:
            outcome["code"] = join_stage_training(node, 1, wait_s=300, **kwargs)
        except BaseException as e:  # the test reads it
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_two_nodes_train_like_one_process_and_a_lost_node_fails_the_attempt_and_its_retry_resumes(stage, tmp_path):
    """2 "nodes" x 1 process on 127.0.0.1: node 0 runs the training as its stage's task does, node 1 only joins
    (`pillsnap train-node`). Their per-step losses are one process's at the same global batch. Then node 1 is
    killed mid-epoch: node 0's attempt fails within the group's timeout; its retry waits for node 1, which comes
    back, and resumes from the newest checkpoint to the same weights as the run that was not interrupted."""
    one = stage(tmp_path / "one", "train.strategy=sequential")
    reference = _one_process_at_the_same_global_batch(one, tmp_path / "one/stage_1")
    nodes = ("train.strategy=sequential", "train.distributed.nnodes=2", "train.distributed.timeout_minutes=1",
             f"train.distributed.rdzv_endpoint=127.0.0.1:{_free_port()}")
    cfg = stage(tmp_path / "a", *nodes)
    a = layout.stage_dir(cfg.exp_dir, 1)  # where node 0's training task trains, and node 1 looks for its job
    outcome: dict = {}
    node_1 = _node_1(cfg, outcome)
    results = _two_ranks(cfg, a)
    node_1.join(timeout=60)
    assert outcome == {"code": 0}
    _assert_like_one_process(results, reference, a, tmp_path / "one/stage_1")
    assert results["classifier"]["world_size"] == 2

    lost = stage(tmp_path / "b", *nodes[:-1], f"train.distributed.rdzv_endpoint=127.0.0.1:{_free_port()}")
    b = layout.stage_dir(lost.exp_dir, 1)
    outcome = {}
    node_1 = _node_1(lost, outcome)

    def kill_node_1_after_a_recovery_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if any(b.rglob("recovery*.pt")):
                break
            time.sleep(0.2)
        for p in psutil.Process().children(recursive=True):
            line = " ".join(p.cmdline())
            if "--node_rank=1" in line and "torch.distributed.run" in line:
                for q in [*p.children(recursive=True), p]:
                    q.kill()
    import threading
    killer = threading.Thread(target=kill_node_1_after_a_recovery_checkpoint, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(DistributedRunFailed):
        _two_ranks(lost, b)
    assert time.monotonic() - started < 300  # within minutes of the loss, not torch's 30-minute default
    node_1.join(timeout=60)
    assert outcome.get("code", 0) != 0 or "error" in outcome  # node 1's group did not finish
    outcome = {}
    node_1 = _node_1(lost, outcome)  # node 1 comes back; node 0's task retries
    resumed = _two_ranks(lost, b)
    node_1.join(timeout=60)
    assert outcome == {"code": 0} and resumed["classifier"]["resumed_from_step"] >= 4
    theirs = _weights(a)
    for model, weights in _weights(b).items():
        for key, value in weights.items():
            assert torch.equal(value, theirs[model][key]), f"{model} {key}"
