"""ONNX export: files, shapes, metadata, parity on real validation images, and parity failures that must raise."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from flows.cli import main
from pillsnap.infer import export as export_module
from pillsnap.core import layout
from pillsnap.infer.engines import TorchClassifierEngine
from pillsnap.infer.export import ExportParityError, export_stage
from pillsnap.infer.onnx_files import read_metadata
from pillsnap.infer.parity import check_classifier_parity, classifier_parity_images


def test_export_writes_both_models_and_a_passing_report(exported_stage):
    cfg, subset, class_map, report = exported_stage
    out = layout.export_dir(cfg.exp_dir, 1)
    assert report == json.loads((out / "export_report.json").read_text())
    assert report["passed"] and report["ok"] and report["opset"] == 17 and report["failures"] == []
    cls, det = report["classifier"], report["detector"]
    assert cls["input_shapes"] == {"images": ["batch", 3, cfg.classification.image_size, cfg.classification.image_size]}
    assert cls["output_shapes"] == {"logits": ["batch", 6]}
    assert cls["size_bytes"] == (out / "classifier.onnx").stat().st_size > 0
    parity = cls["parity"]
    assert parity["samples"] == 12 and parity["top1_agreement"] >= 0.995 and parity["max_abs_logit_diff"] < 1e-3
    labels = class_map.restrict(subset.loc[subset.kind == "single", "k_code"])
    assert report["k_codes_hash"] == labels.hash
    meta = read_metadata(out / "classifier.onnx")
    assert json.loads(meta["k_codes"]) == labels.k_codes and meta["class_map_hash"] == labels.hash
    assert det["exported"] and det["output_shapes"]["output0"][:2] == ["batch", 5]  # raw head: xywh + 1 class, no NMS
    assert det["parity"]["samples"] > 0 and det["parity"]["map50_diff"] <= cfg.export.max_map_diff
    assert det["parity"]["max_abs_raw_diff"] < 1e-2 and det["activations"]["counts"]["SiLU"] > 0


def test_exported_classifier_takes_any_batch_size(exported_stage):
    cfg = exported_stage[0]
    session = ort.InferenceSession(str(layout.export_dir(cfg.exp_dir, 1) / "classifier.onnx"))
    size = cfg.classification.image_size
    for batch in (1, 5):
        assert session.run(None, {"images": np.zeros((batch, 3, size, size), np.float32)})[0].shape == (batch, 6)


def _copy_stage(trained_stage, tmp_path, make_config, *overrides):
    cfg, subset, class_map = trained_stage
    other = make_config(tmp_path, f"synth.out_dir={cfg.synth.out_dir}", f"paths.data_root={cfg.paths.data_root}",
                        "export.parity_samples=12", *overrides)
    target = layout.classifier_checkpoint(other.exp_dir, 1)
    target.parent.mkdir(parents=True)
    shutil.copy(layout.classifier_checkpoint(cfg.exp_dir, 1), target)
    return other, subset, class_map


def test_classifier_exports_without_a_detector(trained_stage, tmp_path, make_config):
    cfg, subset, class_map = _copy_stage(trained_stage, tmp_path, make_config)
    report = export_stage(cfg, 1, subset, class_map, slim=False)
    assert report["passed"] and report["classifier"]["exported"]
    assert report["detector"]["exported"] is False and "no detector checkpoint" in report["detector"]["reason"]
    assert not (layout.export_dir(cfg.exp_dir, 1) / "detector.onnx").exists()


def _reverse_head_rows(path):
    """Tamper with the exported weights: the classifier head's rows reversed (class i scores as class K-1-i)."""
    model = onnx.load(str(path))
    heads = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 6]
    assert heads, "no (6, C) head weight found in the exported classifier"
    for tensor in heads:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[::-1].copy(), tensor.name))
    onnx.save(model, str(path))


def test_tampered_onnx_weights_fail_parity_directly(exported_stage, tmp_path):
    cfg, subset, class_map, _ = exported_stage
    from pillsnap.models.classifier import load_classifier
    model, _ = load_classifier(cfg, layout.classifier_checkpoint(cfg.exp_dir, 1), class_map)
    tampered = tmp_path / "classifier.onnx"
    shutil.copy(layout.export_dir(cfg.exp_dir, 1) / "classifier.onnx", tampered)
    _reverse_head_rows(tampered)
    images = classifier_parity_images(subset, 12)
    size = cfg.classification.image_size
    result = check_classifier_parity(TorchClassifierEngine(model), tampered, images, size, 0.995)
    assert not result.passed and result.max_abs_logit_diff > 1e-3 and result.top1_agreement < 0.995


@pytest.mark.parametrize("how", ["tampered_weights", "threshold"])
def test_failed_parity_writes_the_report_and_raises(how, trained_stage, tmp_path, make_config, monkeypatch):
    overrides = ["detection.enabled=false"] + (["export.min_top1_agreement=1.01"] if how == "threshold" else [])
    cfg, subset, class_map = _copy_stage(trained_stage, tmp_path, make_config, *overrides)
    if how == "tampered_weights":  # a broken optimiser pass: the shipped file differs from the torch model
        monkeypatch.setattr(export_module, "slim_in_place", lambda path: _reverse_head_rows(path) or "tampered")
    with pytest.raises(ExportParityError, match=r"classifier: top-1 agreement [0-9.]+ < export.min_top1_agreement"):
        export_stage(cfg, 1, subset, class_map)
    report = json.loads((layout.export_dir(cfg.exp_dir, 1) / "export_report.json").read_text())
    assert report["passed"] is False and report["failures"]
    assert report["detector"] == {"exported": False, "reason": "detection.enabled=false"}


def test_export_command(trained_stage, tmp_path, make_config, capsys):
    cfg, _, _ = _copy_stage(trained_stage, tmp_path, make_config)
    from pillsnap.data.prepare import class_map_path
    class_map_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(class_map_path(trained_stage[0]), class_map_path(cfg))
    subset_dir = cfg.exp_dir / "data" / "stage_1"
    shutil.copytree(trained_stage[0].exp_dir / "data" / "stage_1", subset_dir, ignore=shutil.ignore_patterns("yolo"))
    args = ["export", "--stage", "1", "--no-slim", "--profile", "ci", f"paths.exp_dir={cfg.exp_dir}",
            "export.parity_samples=4"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["classifier"]["parity"]["samples"] == 4


def test_onnx_label_space_is_checked_against_the_class_map(exported_stage, tmp_path):
    from pillsnap.data.class_map import ClassMapError
    from pillsnap.infer.engines import onnx_label_space
    from pillsnap.infer.onnx_files import write_metadata

    cfg, _, class_map, report = exported_stage
    copy = tmp_path / "classifier.onnx"
    shutil.copy(layout.export_dir(cfg.exp_dir, 1) / "classifier.onnx", copy)
    assert onnx_label_space(copy, class_map).hash == report["k_codes_hash"]
    write_metadata(copy, {**read_metadata(copy), "class_map_hash": "0123456789abcdef"})
    with pytest.raises(ClassMapError, match="refusing to remap silently"):
        onnx_label_space(copy, class_map)
