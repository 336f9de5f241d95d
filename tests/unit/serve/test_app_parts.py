"""API parts in process: a model failure is a 500 with an error id in the log, readiness before and after
loading, no start without keys, micro-batching shares forward passes and gives each caller its rows."""
import io
import logging
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pillsnap.config import ServeConfig
from pillsnap.serve.app import create_app
from pillsnap.serve.batching import BatchingEngine

KEY = {"X-API-Key": "k"}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class BrokenPredictor:
    default_mode = "single"

    def predict(self, image, mode=None, name=None):
        raise RuntimeError("CUDA error: the model broke")


def _client(loader, **cfg):
    return TestClient(create_app(loader, ServeConfig(**cfg), {"k"}))


def test_a_model_failure_is_a_500_with_an_error_id_that_is_also_logged(caplog):
    with _client(lambda: (BrokenPredictor(), {"stage": 1})) as client:
        for _ in range(50):
            if client.get("/ready", headers=KEY).status_code == 200:
                break
            time.sleep(0.05)
        with caplog.at_level(logging.ERROR, logger="pillsnap"):
            answer = client.post("/v1/predict", headers=KEY, files={"image": ("a.png", _png())})
    assert answer.status_code == 500 and "error_id" in answer.json()
    assert any(answer.json()["error_id"] in r.getMessage() for r in caplog.records)


def test_ready_is_503_until_the_models_are_loaded_and_says_why_when_loading_failed():
    release = threading.Event()

    def slow_loader():
        release.wait(5)
        raise FileNotFoundError("no classifier checkpoint for stage 3")

    with _client(slow_loader) as client:
        assert client.get("/ready", headers=KEY).json() == {"ready": False, "reason": "loading"}
        assert client.post("/v1/predict", headers=KEY, files={"image": ("a.png", _png())}).status_code == 503
        release.set()
        time.sleep(0.3)
        answer = client.get("/ready", headers=KEY)
    assert answer.status_code == 503 and "no classifier checkpoint for stage 3" in answer.json()["reason"]


def test_no_start_without_a_key_unless_told_the_network_is_trusted():
    with pytest.raises(ValueError, match="PILLSNAP_API_KEYS"):
        create_app(lambda: None, ServeConfig(), set())
    create_app(lambda: None, ServeConfig(require_api_key=False), set())


class SlowEngine:
    name = "fake"

    def __init__(self):
        self.batches = []

    def logits(self, batch):
        self.batches.append(len(batch))
        time.sleep(0.02)
        return batch[:, :1, 0, 0] * np.ones((1, 3), np.float32)  # each row echoes its own value


def test_concurrent_calls_share_forward_passes_and_get_their_own_rows():
    engine = SlowEngine()
    batching = BatchingEngine(engine, max_rows=32)

    def call(i):
        rows = np.full((1 + i % 3, 3, 2, 2), float(i), np.float32)
        return i, batching.logits(rows)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(call, range(48)))
    for i, out in answers:
        assert out.shape == (1 + i % 3, 3) and (out == i).all()
    assert batching.calls == 48 and batching.passes < 48 and max(engine.batches) <= 32


HEIC = Path(__file__).parent / "data" / "phone_photo.heic"  # a phone-style HEIC (made once with pillow-heif)


def test_a_heic_phone_photo_is_decoded():
    from pillsnap.serve.uploads import decode_upload

    image = decode_upload(HEIC.read_bytes(), 10**7, 32)
    assert image.size == (96, 128) and image.mode == "RGB" and image.getpixel((48, 64))[0] > 200  # the orange pill


def test_a_refusal_names_the_real_reason_and_a_tiny_photo_is_refused():
    from pillsnap.serve.uploads import UploadRejected, decode_upload

    with pytest.raises(UploadRejected) as not_image:
        decode_upload(b"hello, not a photo", 10**7, 32)
    assert not_image.value.status == 415 and "no decoder recognises" in not_image.value.reason
    assert "ModuleNotFoundError" not in not_image.value.reason
    one_pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(one_pixel, format="PNG")
    with pytest.raises(UploadRejected) as tiny:
        decode_upload(one_pixel.getvalue(), 10**7, 32)
    assert tiny.value.status == 422 and "serve.min_image_side=32" in tiny.value.reason
