"""One Prefect test harness for the whole session (~12 s to start); never nest a second one."""
import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    from tasks.common import use_forkserver_workers

    use_forkserver_workers()  # as the training tasks do: forked loader workers die beside Prefect's services
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def flow_overrides(tiny_aihub, tmp_path):
    """Overrides that point a flow at the shared tiny data and a fresh experiment dir (the ci profile: the shipped
    interleaved training of both models, at toy sizes)."""
    return [f"paths.exp_dir={tmp_path / 'exp'}", f"synth.out_dir={tiny_aihub}", f"paths.data_root={tiny_aihub}"]


@pytest.fixture()
def classifier_only(flow_overrides):
    """The orchestration tests' speed-up: the detector off, so a stage trains one model (the sequential path)."""
    return [*flow_overrides, "detection.enabled=false"]
