"""`make gpu-check` where there is no GPU: every row's code runs at tiny sizes (--cpu-smoke) and the run exits with
the distinct no-CUDA code; its verdicts fail on bad evidence."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the GPU check")


@pytest.mark.slow
def test_a_cpu_smoke_run_exercises_every_row_and_exits_with_the_no_cuda_code(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == gpu_check.NO_CUDA_EXIT, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["name"]: r["status"] for r in doc["rows"]}
    assert list(rows) == [name for name, *_ in gpu_check.ROWS]
    assert {name for name, status in rows.items() if status == "no CUDA"} == {
        "environment", "gpu tests", "nvml in D-10", "augmentation"}
    assert all(status == "smoke pass" for name, status in rows.items() if status != "no CUDA"), rows
    assert doc["verdict"] == "no CUDA: nothing accepted" and "gpu-check: no CUDA" in done.stdout


def _check(lines):
    check = gpu_check.Check(gpu_check.parse_args([]), Path("unused"))
    check.lines = lines
    return check


def test_the_nvml_row_fails_when_a_models_line_has_no_nvml_figure():
    row = gpu_check.Row("nvml in D-10", "")
    gpu_check.row_nvml(_check(["[train] e=1/2 s=5/20 loss=1.0 lr=1e-3 data=0.1s comp=0.2s thr=9.0/s cuda=900MB "
                               "nvml=1200MB", "[train/det] e=1/2 s=5/20 loss=1.0 lr=1e-3 data=0.1s comp=0.2s "
                               "thr=9.0/s cuda=700MB"]), row)
    assert row.status == "fail" and row.measured == {"[train]": 1200}
    gpu_check.row_nvml(_check(["[train] … cuda=900MB nvml=1200MB", "[train/det] … cuda=700MB nvml=1300MB"]), row)
    assert row.status == "pass"


def test_one_failed_row_makes_the_run_not_accepted_even_without_cuda():
    check = _check([])
    rows = [gpu_check.Row("a", "", "no CUDA"), gpu_check.Row("b", "", "smoke pass")]
    assert gpu_check.exit_code(check, rows) == gpu_check.NO_CUDA_EXIT
    assert gpu_check.exit_code(check, [*rows, gpu_check.Row("c", "", "error")]) == 1
