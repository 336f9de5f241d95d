"""The stage's API check: start `pillsnap serve` on the stage's exported models on a free loopback port, wait for
/ready, send validation photos through /v1/predict (the answers must match the in-process pipeline), measure
the API's latency (p50 / p95) and throughput under a bounded load, and stop it.

Its result is what the gates read: production_api_deployment (every step above passed),
scalability.api_response_time_ms (p95, client-side, single mode), production.throughput_img_s and
production.api_success_pct (answered / planned: a request the time budget left unsent is not a success), each
with the serving device; and automated_monitoring (/metrics,
scraped at the end, counted exactly the answers the clients received). The load is bounded in requests and in time, and only ever goes to 127.0.0.1.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence


from pillsnap.config import PillSnapConfig, to_yaml

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, url: str, key: str, process: subprocess.Popen, log_path: Path, started_s: float):
        self.url, self.key, self.process, self.log_path, self.started_s = url, key, process, log_path, started_s
        self.ready: Dict[str, Any] = {}  # what /ready answered: the served model's identity among it

    @property
    def headers(self) -> Dict[str, str]:
        return {"X-API-Key": self.key}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


@contextmanager
def running_server(cfg: PillSnapConfig, stage: int, engine: str, timeout_s: float,
                   overrides: Sequence[str] = ()) -> Iterator[RunningServer]:
    """A real API process (`python -m pillsnap.serve`, what `pillsnap serve` runs) on a free loopback port with a
    fresh key; stopped on exit."""
    import httpx

    key, port = secrets.token_urlsafe(16), free_port()
    with tempfile.TemporaryDirectory(prefix="pillsnap-serve-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(to_yaml(cfg))
        log_path = Path(tmp) / "server.log"
        env = {**os.environ, "PILLSNAP_API_KEYS": key, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "pillsnap.serve", "--config", str(config), "--stage", str(stage),
                   "--engine", engine, "--host", LOOPBACK, "--port", str(port), *overrides]
        started = time.monotonic()
        with open(log_path, "w") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = RunningServer(f"http://{LOOPBACK}:{port}", key, process, log_path, 0.0)
        try:
            _wait_ready(server, httpx, started + timeout_s)
            server.started_s = time.monotonic() - started
            yield server
        finally:
            process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: RunningServer, httpx, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the API process exited ({server.process.returncode}): {server.log_text()[-2000:]}")
        try:
            answer = httpx.get(f"{server.url}/ready", headers=server.headers, timeout=2)
            if answer.status_code == 200:
                server.ready = answer.json()
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the API was not ready within the time limit: {server.log_text()[-2000:]}")


def post_photo(client, server: RunningServer, path: str, mode: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        answer = client.post(f"{server.url}/v1/predict", params={"mode": mode}, headers=server.headers,
                             files={"image": (Path(path).name, f.read(), "image/png")}, timeout=60)
    answer.raise_for_status()
    return answer.json()


def api_smoke_test(cfg: PillSnapConfig, stage: int, photos: Sequence[str], engine: str = "onnx") -> Dict[str, Any]:
    """Start, check, measure, stop. Never raises for an API failure: the result says what failed."""
    import httpx

    from pillsnap.core.devices import device_name, serving_device
    from pillsnap.infer.predict import load_predictor

    s = cfg.serve
    out: Dict[str, Any] = {"engine": engine, "device": device_name(serving_device(cfg)), "deployed": False,
                           "photos": len(photos)}
    if not photos:
        return {**out, "reason": "no validation photos to send"}
    try:
        with running_server(cfg, stage, engine, s.smoke_timeout_s) as server:
            out["ready_s"] = round(server.started_s, 2)
            out["model"] = server.ready.get("model")  # which files answered, by sha256
            # what made the figures: the ONNX session's provider, not the device asked for
            out["runs_on"] = server.ready.get("runs_on")
            with httpx.Client() as client:
                first = post_photo(client, server, photos[0], "single")
            reference = load_predictor(cfg, stage, engine).predict(photos[0], "single")
            out["answer_matches_pipeline"] = _same_answer(first, reference)
            out.update(_load_test(server, photos, s.smoke_requests, s.smoke_concurrency, s.smoke_timeout_s))
            out["monitoring"] = _scrape_metrics(server, answered=1 + out["requests"] - out["errors"])
    except Exception as e:  # noqa: BLE001 - the check's verdict, not a crash of the stage
        log.warning("API check failed: %s: %s", type(e).__name__, str(e)[:500])
        return {**out, "reason": f"{type(e).__name__}: {str(e)[:500]}"}
    out["deployed"] = bool(out["answer_matches_pipeline"] and out["errors"] == 0 and not out["unsent"])
    if not out["deployed"]:
        out["reason"] = "answers differ from the pipeline" if not out["answer_matches_pipeline"] else \
            f"{out['errors']} of {out['requests']} requests sent failed and {out['unsent']} of {out['planned']} " \
            f"planned were not sent within serve.smoke_timeout_s ({s.smoke_timeout_s:g} s)"
    log.info("API check (%s on %s): %s", engine, out.get("runs_on") or out["device"], out)
    return out


def _same_answer(api: Dict[str, Any], local: Dict[str, Any], tolerance: float = 1e-4) -> bool:
    a, b = api.get("pills") or [], local.get("pills") or []
    return len(a) == len(b) and all(x["k_code"] == y["k_code"] and abs(x["confidence"] - y["confidence"]) <= tolerance
                                    for x, y in zip(a, b))


def _load_test(server: RunningServer, photos: Sequence[str], requests: int, clients: int,
               budget_s: float) -> Dict[str, Any]:
    """`requests` single-mode photos from `clients` concurrent clients, stopping early at `budget_s`. A planned
    request the budget left unsent counts: the success share is answered / planned, never answered / sent."""
    import httpx

    deadline = time.monotonic() + budget_s
    order = [photos[i % len(photos)] for i in range(requests)]
    latencies: List[float] = []
    failures: List[str] = []  # list.append is atomic: the client threads share these two

    def client_loop(part: List[str]) -> None:
        with httpx.Client() as client:
            for path in part:
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    post_photo(client, server, path, "single")
                    latencies.append((time.perf_counter() - start) * 1000)
                except Exception as e:  # noqa: BLE001 - counted; the load goes on
                    failures.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client_loop, [order[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - started
    errors = len(failures)
    sent = len(latencies) + errors
    return {"planned": requests, "requests": sent, "unsent": requests - sent, "errors": errors, "clients": clients,
            "first_errors": failures[:3],
            **_windowed(latencies),
            "throughput_img_s": len(latencies) / wall if wall > 0 else None}


def _windowed(latencies_ms: List[float]) -> Dict[str, Any]:
    """p50 / p95 as the latency gates read them (pillsnap.infer.latency.percentiles: the median of windows)."""
    from pillsnap.infer.latency import percentiles

    measured = percentiles(latencies_ms)
    return {"p50_ms": measured.get("p50"), "p95_ms": measured.get("p95"), "latency_windows": measured.get("windows"),
            "window_p95_ms": measured.get("window_p95")}


def _scrape_metrics(server: RunningServer, answered: int) -> Dict[str, Any]:
    """/metrics must count every predict answer the clients got, in its request counter and latency histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10).text
    counted = {"requests": 0.0, "latency_observations": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("endpoint") != "/v1/predict":
                continue
            if sample.name == "pillsnap_requests_total" and sample.labels.get("status") == "200":
                counted["requests"] += sample.value
            elif sample.name == "pillsnap_request_latency_seconds_count":
                counted["latency_observations"] += sample.value
    ok = counted["requests"] == answered and counted["latency_observations"] >= answered
    return {"answered": answered, **{k: int(v) for k, v in counted.items()}, "ok": ok}


def smoke_photos(rows, n: int) -> List[str]:
    """Up to n validation photos of single pills, in a fixed order."""
    val = rows[(rows["split"] == "val") & (rows["kind"] == "single")].sort_values("image_id")
    return list(val["image_path"][:n])

