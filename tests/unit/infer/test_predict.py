"""The prediction pipeline: single | combo | auto on both engines; EVERY detection classified; routing reasons."""
import json

import numpy as np
import pytest

from flows.cli import main
from pillsnap.data.manifest import boxes_of
from pillsnap.infer.detection import Detector, letterbox, load_bgr
from pillsnap.infer.hard_cases import read_hard_cases
from pillsnap.infer.engines import InferenceSetupError
from pillsnap.infer.predict import Predictor, load_predictor

KEYS = {"image", "mode_requested", "mode_used", "fallback_reason", "gating_score", "single_confidence", "pills"}


class CountingEngine:
    """Wraps a classifier engine and counts the crops it classifies."""

    def __init__(self, inner):
        self.inner, self.name, self.crops = inner, inner.name, 0

    def logits(self, batch):
        self.crops += len(batch)
        return self.inner.logits(batch)


def ground_truth_detector(image_path, size, with_duplicates=True):
    """A Detector whose raw head 'sees' the true boxes of one photo (each also with a weaker near-duplicate that
    the shared NMS must drop), so the pipeline around the detector is tested with known boxes."""
    info = letterbox(load_bgr(image_path), size)[1]
    boxes = []
    for rows in (GT_BOXES[image_path],):
        for x, y, w, h in rows:
            cx = (x + w / 2) * info.scale_w + info.pad_left
            cy = (y + h / 2) * info.scale_h + info.pad_top
            boxes.append([cx, cy, w * info.scale_w, h * info.scale_h, 0.9])
            if with_duplicates:
                boxes.append([cx + 0.5, cy, w * info.scale_w, h * info.scale_h, 0.6])
    raw = np.array(boxes, np.float32).T  # (5, N): xywh + the one class score

    def predict_raw(batch):
        return np.repeat(raw[None], len(batch), 0)

    return Detector(predict_raw, size, 0.25, 0.5, 50)


GT_BOXES = {}


@pytest.fixture(scope="module")
def photos(exported_stage):
    _, subset, _, _ = exported_stage
    single = subset[(subset.kind == "single") & (subset.split == "val")].iloc[0]
    combo = subset[subset.kind == "combination"].iloc[0]
    for row in (single, combo):
        GT_BOXES[row.image_path] = [b["bbox"] for b in boxes_of(row)]
    return single.image_path, combo.image_path


def _predictor(cfg, engine, threshold=None, detector=None, hard_cases=None):
    base = load_predictor(cfg, 1, engine, hard_cases)
    loader = (lambda: detector) if detector is not None else None
    return Predictor(CountingEngine(base.classifier), base.labels, base.image_size, base.crop_padding,
                     base.threshold if threshold is None else threshold, loader, True, "auto", hard_cases)


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_single_mode_classifies_the_whole_photo_and_never_loads_the_detector(exported_stage, photos, engine):
    cfg, _, class_map, _ = exported_stage
    predictor = load_predictor(cfg, 1, engine)
    assert predictor.has_detector and not predictor.detector_loaded
    result = predictor.predict(photos[0], "single")
    assert KEYS <= set(result) and result["mode_used"] == "single" and result["fallback_reason"] is None
    (pill,) = result["pills"]
    assert pill["k_code"] in predictor.k_codes and pill["drug_name"] == class_map.names[pill["k_code"]]
    assert 0 < pill["confidence"] <= 1 and pill["box"] == [0.0, 0.0, 96.0, 128.0]
    assert [t["k_code"] for t in pill["top5"]][0] == pill["k_code"] and len(pill["top5"]) == 5
    assert [t["confidence"] for t in pill["top5"]] == sorted((t["confidence"] for t in pill["top5"]), reverse=True)
    info = class_map.info[pill["k_code"]]
    assert pill["identifiers"]["edi_codes"] == info["edi_codes"] and pill["identifiers"]["edi_codes"]
    assert pill["identifiers"]["imprint"] == info["imprint"] and pill["identifiers"]["colours"]
    assert not predictor.detector_loaded  # lazy: single-pill requests never pay for the detector
    json.dumps(result)  # serialisable as it is


def test_torch_and_onnx_agree(exported_stage, photos):
    cfg = exported_stage[0]
    a = load_predictor(cfg, 1, "torch").predict(photos[0], "single")["pills"][0]
    b = load_predictor(cfg, 1, "onnx").predict(photos[0], "single")["pills"][0]
    assert a["k_code"] == b["k_code"] and abs(a["confidence"] - b["confidence"]) < 1e-4


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_combo_classifies_every_detection(exported_stage, photos, engine):
    cfg = exported_stage[0]
    combo = photos[1]
    truth = GT_BOXES[combo]
    assert len(truth) >= 2
    predictor = _predictor(cfg, engine, detector=ground_truth_detector(combo, cfg.detection.image_size))
    result = predictor.predict(combo, "combo")
    assert result["mode_used"] == "combo" and result["fallback_reason"] == "manual_combo"
    assert len(result["pills"]) == len(truth) == predictor.classifier.crops  # one crop per detection, duplicates NMS'd
    for pill, (x, y, w, h) in zip(sorted(result["pills"], key=lambda p: p["box"]), sorted(truth)):
        assert np.allclose(pill["box"], [x, y, x + w, y + h], atol=2.5)  # original pixels, not letterbox
        assert pill["k_code"] in predictor.k_codes and 0 < pill["detection_confidence"] <= 1


def test_auto_routing_with_forced_thresholds(exported_stage, photos):
    cfg = exported_stage[0]
    single, combo = photos
    confident = _predictor(cfg, "torch", threshold=0.0,
                           detector=ground_truth_detector(single, cfg.detection.image_size, with_duplicates=False))
    stays = confident.predict(single, "auto")
    assert stays["mode_used"] == "single" and stays["fallback_reason"] is None
    assert stays["objects_hint"] == {"count": 1, "source": "detector"} and confident.classifier.crops == 1

    unsure = _predictor(cfg, "torch", threshold=1.01,
                        detector=ground_truth_detector(single, cfg.detection.image_size))
    low = unsure.predict(single, "auto")
    assert low["mode_used"] == "combo" and low["fallback_reason"] == "low_confidence"
    assert low["gating_score"] == low["single_confidence"] < 1.01 and len(low["pills"]) == 1
    assert unsure.classifier.crops == 2  # the whole photo, then the one detected pill

    multi = _predictor(cfg, "torch", threshold=0.0, detector=ground_truth_detector(combo, cfg.detection.image_size))
    result = multi.predict(combo, "auto")
    n = len(GT_BOXES[combo])
    assert result["mode_used"] == "combo" and result["fallback_reason"] == "multi_object_hint"
    assert len(result["pills"]) == n and multi.classifier.crops == 1 + n
    assert result["gating_score"] == pytest.approx(result["single_confidence"] / n)


def test_auto_keeps_the_whole_image_answer_when_the_detector_finds_nothing(exported_stage, photos):
    cfg = exported_stage[0]
    blind = Detector(lambda batch: np.zeros((len(batch), 5, 0), np.float32), cfg.detection.image_size, 0.25, 0.5, 50)
    result = _predictor(cfg, "torch", threshold=1.01, detector=blind).predict(photos[0], "auto")
    assert result["mode_used"] == "single" and result["fallback_reason"] is None and len(result["pills"]) == 1
    assert result["note"].startswith("low_confidence: the detector found no pill")
    assert _predictor(cfg, "torch", detector=blind).predict(photos[1], "combo")["pills"] == []


def test_auto_without_detector_uses_the_image_heuristic(exported_stage, photos):
    cfg = exported_stage[0]
    single, combo = photos
    predictor = _predictor(cfg, "torch", threshold=0.0)
    assert not predictor.has_detector
    one = predictor.predict(single, "auto")
    assert one["objects_hint"] == {"count": 1, "source": "image_heuristic"} and one["mode_used"] == "single"
    many = predictor.predict(combo, "auto")
    assert many["objects_hint"]["count"] >= 2 and many["mode_used"] == "single" and many["fallback_reason"] is None
    assert "multi_object_hint: combo unavailable (no detector)" in many["note"]
    with pytest.raises(InferenceSetupError, match="combo mode needs a detector"):
        predictor.predict(combo, "combo")


def test_hard_cases_are_logged_with_the_d3_fields(exported_stage, photos, tmp_path):
    cfg = exported_stage[0]
    log = tmp_path / "hard_cases.jsonl"
    predictor = _predictor(cfg, "torch", threshold=1.01,
                           detector=ground_truth_detector(photos[0], cfg.detection.image_size), hard_cases=log)
    predictor.predict(photos[0], "auto")
    (case,) = read_hard_cases(log)
    assert case["mode_used"] == "combo" and case["fallback_reason"] == "low_confidence"
    assert {"gating_score", "single_confidence", "pred_kcode", "image_path"} <= set(case)


def test_predict_command_prints_json(exported_stage, photos, capsys):
    cfg = exported_stage[0]
    args = ["predict", "--mode", "single", "--engine", "onnx", "--stage", "1", "--profile", "ci", *photos,
            f"paths.exp_dir={cfg.exp_dir}"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(photos) and all(len(r["pills"]) == 1 for r in results)
    model = results[0]["model"]  # every answer names the model: stage, export file hashes, class-map hash
    assert model["stage"] == 1 and model["engine"] == "onnx" and len(model["class_map_hash"]) == 16
    assert model["files"]["classifier"]["path"].endswith("classifier.onnx")
    assert len(model["files"]["classifier"]["sha256"]) == 64 and all(r["model"] == model for r in results)


def test_predict_answers_every_readable_photo_and_reports_the_unreadable(exported_stage, photos, capsys, tmp_path):
    cfg = exported_stage[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n only a header")
    args = ["predict", "--mode", "single", "--stage", "1", "--profile", "ci", photos[0], str(broken), photos[1],
            f"paths.exp_dir={cfg.exp_dir}"]
    assert main(args) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["image"] for r in results] == [photos[0], str(broken), photos[1]]
    assert "pills" in results[0] and "pills" in results[2] and "cannot read image" in results[1]["error"]
    assert str(broken) in captured.err


def test_an_onnx_figure_names_the_provider_that_made_it(monkeypatch):
    """A CPU build of onnxruntime on a GPU machine runs the model on the CPU: its figures say so, and how to fix
    it; the CUDA provider's say the GPU."""
    import torch

    import pillsnap.infer.engines as engines

    monkeypatch.setattr(engines, "device_name", lambda d: f"{d.type}: the {d.type} model")
    gpu = torch.device("cuda")
    on_cpu = engines.onnx_runs_on(["CPUExecutionProvider"], gpu)
    assert on_cpu.startswith("cpu: ") and "no CUDA provider" in on_cpu and "onnxruntime-gpu" in on_cpu
    assert engines.onnx_runs_on(["CUDAExecutionProvider", "CPUExecutionProvider"], gpu).startswith("cuda: ")
    assert engines.onnx_runs_on(["CPUExecutionProvider"], torch.device("cpu")) == "cpu: the cpu model (onnxruntime CPU)"
