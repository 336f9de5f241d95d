"""The launcher's guarantees, on a stand-in for torchrun (a process with a child of its own, like the agent and its
ranks): no process of the group outlives a timeout, an exception raised into the launching thread, or a group that
ignores SIGTERM; output is relayed line by line. The real torchrun is in test_ranks.py."""
from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
import threading
import time

import psutil
import pytest

from pillsnap.config import DistributedConfig
from pillsnap.train.distributed import launch
from pillsnap.train.distributed.launch import DistributedRunFailed, kill_group, run_training_processes
from pillsnap.train.distributed.world import launch_spec

# Prints a line, starts a child that sleeps (a "rank"), then says nothing: a hung collective, seen from outside.
SILENT_GROUP = ("import subprocess, sys, time\n"
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                "print('agent started', flush=True)\n"
                "time.sleep(300)\n")


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    def use(code: str):
        marked = f"{code}\n# {tmp_path}"  # tells this test's stand-in from another test's
        monkeypatch.setattr(launch, "torchrun_command", lambda spec, job: [sys.executable, "-c", marked])
    return use


def _group_of(tmp_path) -> list:
    """The stand-in this test started and its child."""
    for child in psutil.Process().children():
        if str(tmp_path) in " ".join(child.cmdline()):
            return [child, *child.children()]
    return []


def _start(tmp_path, **kwargs) -> tuple:
    box: dict = {}

    def target():
        box["ident"] = threading.get_ident()
        try:
            run_training_processes({}, 1, tmp_path / "stage_1", None, None,
                                   launch_spec(DistributedConfig(nproc_per_node="2"), gpus=0), **kwargs)
        except BaseException as e:  # noqa: BLE001 - the test reads what ended the launcher
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline, group = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(group) < 2:  # the stand-in and its child are up
        time.sleep(0.2)
        group = _group_of(tmp_path)
    assert len(group) == 2, "the stand-in did not start its child"
    return thread, box, group


def test_a_silent_group_past_its_timeout_is_stopped_and_killed(tmp_path, stand_in):
    stand_in(SILENT_GROUP)
    thread, box, group = _start(tmp_path, timeout_s=5)  # the stand-in and its child start well within it
    thread.join(30)
    assert not thread.is_alive(), "the launcher waited for a line that never came"
    assert isinstance(box["error"], DistributedRunFailed) and "ran past 5 s" in str(box["error"])
    gone, alive = psutil.wait_procs(group, timeout=30)
    assert not alive


def test_an_exception_raised_into_the_launching_thread_arrives_and_kills_the_group(tmp_path, stand_in):
    """How Prefect ends a task that runs in a worker thread on its timeout: an asynchronous exception."""
    stand_in(SILENT_GROUP)
    thread, box, group = _start(tmp_path)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(box["ident"]), ctypes.py_object(TimeoutError))
    thread.join(30)
    assert not thread.is_alive() and isinstance(box["error"], TimeoutError)
    gone, alive = psutil.wait_procs(group, timeout=30)
    assert not alive


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(1, flush=True)\n"
                                 "time.sleep(300)"], stdout=subprocess.PIPE, start_new_session=True)
    stubborn.stdout.readline()  # its handler is set
    started = time.monotonic()
    kill_group(stubborn, grace_s=1)
    assert stubborn.returncode == -9 and time.monotonic() - started < 10


def test_lines_are_relayed_as_they_come_carriage_returns_included(tmp_path, stand_in, caplog):
    stand_in("import sys\nsys.stdout.write('one\\rtwo\\nthree')\nsys.stdout.flush()\nsys.exit(3)\n")
    with caplog.at_level(logging.INFO, logger="pillsnap.train.distributed"), \
            pytest.raises(DistributedRunFailed, match="exited with code 3 and no rank said why"):
        run_training_processes({}, 1, tmp_path / "stage_1", None, None,
                               launch_spec(DistributedConfig(nproc_per_node="2"), gpus=0))
    assert [r.getMessage() for r in caplog.records][1:] == ["one", "two", "three"]
