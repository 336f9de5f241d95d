"""D-9 reports: metrics.json history, confusion pairs + heatmap, ROC/PR, hard cases, detection drawings."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pillsnap.evaluate import plots
from pillsnap.metrics.classification import most_confused_pairs
from pillsnap.infer import hard_cases
from pillsnap.infer.hard_cases import HardCase


def confused_labels():
    """Classes 0..199, mostly right; 0<->1 confused 5 + 2 times, 7->3 three times, 60 more single mistakes."""
    y_true = list(np.repeat(np.arange(200), 5))
    y_pred = list(y_true)
    mistakes = [(0, 1)] * 5 + [(1, 0)] * 2 + [(7, 3)] * 3 + [(100 + i, 20 + i) for i in range(60)]
    y_true += [t for t, _ in mistakes]
    y_pred += [p for _, p in mistakes]
    return np.array(y_true), np.array(y_pred)


def test_most_confused_pairs_counts_both_directions():
    y_true, y_pred = confused_labels()
    names = [f"K-{i:06d}" for i in range(200)]
    pairs = most_confused_pairs(y_true, y_pred, names, top_n=3)
    assert [(p["class_a"], p["class_b"], p["a_as_b"], p["b_as_a"], p["total"]) for p in pairs[:2]] == [
        ("K-000000", "K-000001", 5, 2, 7),
        ("K-000003", "K-000007", 0, 3, 3),
    ]
    assert len(pairs) == 3 and pairs[2]["total"] == 1
    assert pairs[0]["rate_a_as_b"] == pytest.approx(5 / 10)
    assert most_confused_pairs([1, 2], [1, 2]) == []


def test_confused_pairs_scale_to_thousands_of_classes():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5000, 50_000)
    y_pred = np.where(rng.random(50_000) < 0.9, y_true, rng.integers(0, 5000, 50_000))
    pairs = most_confused_pairs(y_true, y_pred, top_n=25)
    assert len(pairs) == 25 and pairs[0]["total"] >= pairs[-1]["total"]


def test_confusion_report_draws_only_the_involved_classes(tmp_path):
    y_true, y_pred = confused_labels()
    summary = plots.save_confusion_report(y_true, y_pred, tmp_path, top_n=40)
    assert len(summary["pairs"]) == 40
    assert 2 < summary["heatmap_classes"] <= plots.MAX_HEATMAP_CLASSES
    with Image.open(summary["png"]) as png:
        assert png.format == "PNG" and png.width > 200
    saved = json.loads((tmp_path / "confusion_classification.json").read_text())
    assert saved["pairs"][0]["total"] == 7


def test_heatmap_refuses_more_than_50_classes(tmp_path):
    pairs = [{"index_a": 2 * i, "index_b": 2 * i + 1} for i in range(40)]
    assert len(plots.classes_in_pairs(pairs)) == 50
    with pytest.raises(ValueError, match="max_classes"):
        plots.classes_in_pairs(pairs, max_classes=80)
    with pytest.raises(ValueError, match="1..50"):
        plots.plot_confusion_subset([0], [1], list(range(51)), tmp_path / "x.png")


def scores_for(y_true, n_classes, signal, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y_true), n_classes))
    logits[np.arange(len(y_true)), y_true] += signal
    prob = np.exp(logits)
    return prob / prob.sum(axis=1, keepdims=True)


def test_roc_pr_matches_sklearn_macro_ovr(tmp_path):
    y_true = np.arange(300) % 6
    y_prob = scores_for(y_true, 6, signal=1.5)
    summary = plots.save_roc_pr_report(y_true, y_prob, tmp_path)
    assert summary["macro_roc_auc"] == pytest.approx(roc_auc_score(y_true, y_prob, multi_class="ovr", average="macro"))
    assert 0.5 < summary["macro_average_precision"] < 1.0
    assert summary["classes_evaluated"] == 6 and summary["classes_skipped"] == 0
    for name in ("roc_classification.png", "pr_classification.png"):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG"
    assert json.loads((tmp_path / "roc_pr_classification.json").read_text())["macro_roc_auc"] == summary["macro_roc_auc"]


def test_roc_pr_skips_classes_absent_from_validation(tmp_path):
    y_true = np.arange(100) % 4  # classes 4..9 never occur
    perfect = np.eye(10)[y_true]
    summary = plots.save_roc_pr_report(y_true, perfect, tmp_path, class_names=[f"K{i}" for i in range(10)])
    assert summary["classes_evaluated"] == 4 and summary["classes_skipped"] == 6
    assert summary["macro_roc_auc"] == pytest.approx(1.0)
    assert summary["macro_average_precision"] == pytest.approx(1.0)
    assert summary["worst_classes_by_ap"][0]["class"] == "K0"


def test_roc_pr_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="columns"):
        plots.save_roc_pr_report([0, 5], np.full((2, 3), 1 / 3), tmp_path)


def test_hard_cases_jsonl_round_trip(tmp_path):
    image = np.full((200, 100, 3), 128, dtype=np.uint8)
    thumb = plots.save_thumbnail(image, tmp_path / "thumbs" / "a.png", max_side=64)
    with Image.open(thumb) as t:
        assert max(t.size) == 64
    cases = [
        HardCase("img/a.png", "K-000001", "K-000002", "single", gating_score=0.41, single_confidence=0.41,
                 thumbnail_path=str(thumb)),
        HardCase("img/b.png", "K-000003", "K-000004", "combo", gating_score=0.12, single_confidence=0.12,
                 fallback_reason="low_single_confidence"),
    ]
    path = tmp_path / "hard_cases" / "stage_1.jsonl"
    assert hard_cases.write_hard_cases(path, cases) == 2
    assert hard_cases.write_hard_cases(path, cases[:1], append=True) == 1
    rows = hard_cases.read_hard_cases(path)
    assert len(rows) == 3
    assert rows[1]["mode_used"] == "combo" and rows[1]["fallback_reason"] == "low_single_confidence"
    assert rows[0]["thumbnail_path"] == str(thumb) and rows[0]["true_kcode"] == "K-000001"
    assert set(rows[0]) >= {"gating_score", "single_confidence", "pred_kcode"}


def test_hard_case_validation():
    with pytest.raises(ValueError, match="mode_used"):
        HardCase("a.png", "K1", "K2", "auto")
    with pytest.raises(ValueError, match="single_confidence"):
        HardCase("a.png", "K1", "K2", "single", single_confidence=1.5)


def test_detections_are_drawn_on_the_image(tmp_path):
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    boxes = [{"xyxy": [40, 50, 120, 110], "label": "K-000001", "score": 0.91}]
    out = plots.draw_detections(image, boxes, tmp_path / "det.png", ground_truth=[{"xyxy": [5, 5, 30, 30]}])
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == image.shape
    assert drawn[80, 40].any() and drawn[110, 80].any()  # left and bottom edges are coloured
    assert not drawn[80, 80].any()  # the inside of the box is untouched
    assert (drawn[5, 15] == 255).all()  # ground truth in white
    assert drawn[40:50, 40:100].any()  # the label sits above the box


def test_detections_from_paths_with_chosen_colours(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(src)
    out = plots.draw_detections(src, [{"xyxy": [1, 1, 40, 40], "label": "K-1", "color": (230, 40, 40)}],
                                tmp_path / "det.png")
    assert tuple(np.asarray(Image.open(out).convert("RGB"))[30, 1]) == (230, 40, 40)  # the left edge, in red
    with pytest.raises(ValueError, match="xyxy"):
        plots.draw_detections(src, [{"box": [1, 1, 2, 2]}], tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        plots.draw_detections(tmp_path / "missing.png", [], tmp_path / "bad.png")


def test_the_report_says_what_the_detector_trained_and_was_validated_on():
    from pillsnap.evaluate.stage_report import _detection_lines

    facts = {"data_yaml": "exp/data/stage_1/yolo/data.yaml", "images": {"train": 600, "val": 106},
             "boxes": {"train": 1112, "val": 214}, "cap": 600,
             "composition": {"train": {"combination": 204, "single": 396}, "val": {"combination": 36, "single": 70}}}
    lines = _detection_lines({"mAP_0.5": 0.99, "trained_on": facts})
    assert lines[1] == ("- detector data (exp/data/stage_1/yolo/data.yaml): train 600 photos (204 combination + "
                        "396 single), 1112 boxes; val 106 photos (36 combination + 70 single), 214 boxes; cap 600")


def test_the_overview_names_every_check_that_did_not_pass_and_metric_names_are_text():
    """Issue 28 point 8: the overview said "decision: GO (all checks passed)" beside cloudflare_tunnel_setup
    unattested, and "mAP@0.5" rendered as a mail link in the Prefect UI."""
    import re

    from pillsnap.evaluate.stage_report import render_stage_report

    subset = {"classes": 6, "classes_requested": 6, "train_single": 48, "train_combination": 3, "val_single": 12,
              "val_combination": 1, "val_per_class": 2, "min_eval_samples": 6}
    checks = {"pipeline_complete": {"status": "pass", "mandatory": True, "definition": "d"},
              "cloudflare_tunnel_setup": {"status": "unattested", "mandatory": False, "definition": "d"},
              "detection_model_loading": {"status": "not_applicable", "mandatory": True, "definition": "d"}}
    decision = {"choice": "proceed", "chosen_by": "policy", "approved": True, "models": {"classifier": "ab" * 32},
                "gates_loosened": [{"key": "data.stages.1.min_eval_samples", "shipped": 2000, "applied": 6}]}
    text = render_stage_report(1, subset, {}, {}, {"decision": "GO", "reasons": [], "rows": []},
                               {"recommendation": "RECOMMEND_PROCEED"}, {}, {}, {"mAP_0.5": 0.9}, checks, decision)
    overview = text.split("## Configuration")[0]
    assert "- Go/No-Go: **GO** (every row passed)" in overview and "all checks passed" not in text
    assert ("stage checks not passing: `cloudflare_tunnel_setup` unattested, `detection_model_loading` "
            "not_applicable") in overview
    assert "judged: classifier `abababababab`" in overview
    assert "`data.stages.1.min_eval_samples` 2000 shipped" in overview
    assert not re.search(r"(?<!`)mAP@", text)  # every mAP@... inside a code span
