"""Activation verification on the built torch model and on the exported ONNX graph (v3 lessons)."""
import pytest
import yaml

from pillsnap.config import DetectionConfig
from pillsnap.models.activations import (ActivationVerificationError, onnx_activation_counts,
                                         torch_activation_counts, verify_onnx_activations, verify_torch_activations)
from pillsnap.models.detector import build_detector, build_from_yaml, export_detector_onnx, write_model_yaml

EXPECTED = {"silu": "SiLU", "relu": "ReLU", "leaky_relu": "LeakyReLU"}
ONNX_OP = {"silu": "SiLU", "relu": "Relu", "leaky_relu": "LeakyRelu"}


@pytest.mark.parametrize("activation", ["silu", "relu", "leaky_relu"])
def test_verifier_passes_when_the_activation_applied(activation, tmp_path):
    model = build_detector(DetectionConfig(scale="n", activation=activation, pretrained=False), tmp_path)  # verifies internally
    counts = torch_activation_counts(model)
    assert counts[EXPECTED[activation]] > 50, counts  # one per Conv, although the instance is shared
    assert set(counts) <= {EXPECTED[activation]}, counts
    onnx_path = export_detector_onnx(model, tmp_path / "m.onnx", image_size=64)
    report = verify_onnx_activations(onnx_path, activation)
    assert report.counts[ONNX_OP[activation]] == counts[EXPECTED[activation]]
    others = {k: v for k, v in report.counts.items() if k not in (ONNX_OP[activation], "Sigmoid")}
    assert not any(others.values()), report.counts
    assert report.counts["Sigmoid"] == 1  # the head's class scores: a lone Sigmoid, not a SiLU


def test_verifier_fails_when_the_yaml_key_is_missing(tmp_path):
    path = write_model_yaml(DetectionConfig(scale="n", activation="relu"), tmp_path)
    spec = yaml.safe_load(path.read_text())
    del spec["activation"]  # named relu, built SiLU: the v3 failure
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    model = build_from_yaml(path)
    with pytest.raises(ActivationVerificationError, match="no ReLU module"):
        verify_torch_activations(model, "relu")
    with pytest.raises(ActivationVerificationError, match="LeakyReLU"):
        verify_torch_activations(model, "leaky_relu")
    onnx_path = export_detector_onnx(model, tmp_path / "silu.onnx", image_size=64)
    assert onnx_activation_counts(onnx_path)["SiLU"] > 50
    with pytest.raises(ActivationVerificationError, match="no Relu"):
        verify_onnx_activations(onnx_path, "relu")


def test_a_partly_converted_model_is_caught(tmp_path):
    import torch.nn as nn

    model = build_detector(DetectionConfig(scale="n", activation="relu", pretrained=False), tmp_path)
    model.model[0].act = nn.SiLU()  # one Conv left behind
    with pytest.raises(ActivationVerificationError, match="1 SiLU activation"):
        verify_torch_activations(model, "relu")


def test_verify_detector_reports_what_was_built(tmp_path):
    from pillsnap.models.detector import verify_detector

    report = verify_detector(DetectionConfig(scale="n", activation="leaky_relu"), tmp_path)
    assert report["backbone"] == "yolo11n-leaky_relu" and report["scale"] == "n"
    assert report["model_yaml"].endswith("yolo11n-leaky_relu.yaml")
    assert report["activation"]["counts"]["LeakyReLU"] > 50 and "SiLU" not in report["activation"]["counts"]
