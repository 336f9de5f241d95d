"""The detector's naming rule, generated yaml, scale from the file name, local pretrained weights, checkpoints."""
import shutil

import pytest
import torch
import yaml

from pillsnap.config import DetectionConfig
from pillsnap.models.detector import (SCALES, DetectorNameError, backbone_name, build_detector, build_from_yaml,
                                      detector_payload, load_detector_checkpoint, model_file_name, parse_model_name,
                                      transfer_pretrained, write_model_yaml)
from pillsnap.core.checkpoints import save_checkpoint


@pytest.mark.parametrize("activation", ["silu", "relu", "leaky_relu"])
@pytest.mark.parametrize("scale", SCALES)
def test_naming_rule_round_trips(scale, activation):
    name = model_file_name(scale, activation)
    assert name == f"yolo11{scale}-{activation}.yaml"
    parsed = parse_model_name(name)
    assert (parsed.scale, parsed.activation) == (scale, activation)
    assert parse_model_name(parsed.stem) == parsed
    assert backbone_name(DetectionConfig(scale=scale, activation=activation)) == parsed.stem


@pytest.mark.parametrize("name, hint", [
    ("yolo11n-leaked.yaml", "activation 'leaked'"), ("yolo11n-leaky.yaml", "did you mean 'leaky_relu'"),
    ("yolo11q-relu.yaml", "scale 'q'"), ("yolov8n-relu.yaml", "naming rule"), ("yolo11n_relu.yaml", "naming rule"),
    ("yolo11n.yaml", "naming rule")])
def test_names_outside_the_rule_are_rejected_clearly(name, hint):
    with pytest.raises(DetectorNameError, match=hint) as err:
        parse_model_name(name)
    assert "yolo11{scale}-{activation}.yaml" in str(err.value)
    with pytest.raises(DetectorNameError):
        model_file_name("n", "leaked")


def test_generated_yaml_has_one_class_and_the_activation_key(tmp_path):
    relu = yaml.safe_load(write_model_yaml(DetectionConfig(scale="n", activation="relu"), tmp_path).read_text())
    leaky = yaml.safe_load(write_model_yaml(DetectionConfig(scale="s", activation="leaky_relu"), tmp_path).read_text())
    silu = yaml.safe_load(write_model_yaml(DetectionConfig(scale="m", activation="silu"), tmp_path).read_text())
    assert relu["activation"] == "nn.ReLU()" and leaky["activation"] == "nn.LeakyReLU(0.1)"
    assert "activation" not in silu
    assert relu["nc"] == leaky["nc"] == silu["nc"] == 1
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == ["yolo11m-silu.yaml", "yolo11n-relu.yaml",
                                                                "yolo11s-leaky_relu.yaml"]


def test_scale_comes_from_the_file_name_and_bad_names_are_refused(tmp_path):
    n = build_from_yaml(write_model_yaml(DetectionConfig(scale="n"), tmp_path))
    s = build_from_yaml(write_model_yaml(DetectionConfig(scale="s"), tmp_path))
    assert n.yaml["scale"] == "n" and s.yaml["scale"] == "s"
    assert sum(p.numel() for p in s.parameters()) > 3 * sum(p.numel() for p in n.parameters())
    wrong = shutil.copy(tmp_path / "yolo11n-silu.yaml", tmp_path / "yolo11n-leaked.yaml")
    with pytest.raises(DetectorNameError, match="leaked"):
        build_from_yaml(wrong)


def test_local_pretrained_weights_transfer_and_checkpoints_round_trip(tmp_path):
    source = build_detector(DetectionConfig(scale="n", activation="relu", pretrained=False), tmp_path / "a")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    weights = save_checkpoint(tmp_path / "pre.pt", detector_payload(source, "yolo11n-relu", 160))
    target = build_detector(DetectionConfig(scale="n", activation="relu", pretrained_path=str(weights)), tmp_path / "b")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a.float(), b.float()), name
    assert load_detector_checkpoint(weights).state_dict().keys() == source.state_dict().keys()
    assert transfer_pretrained(build_detector(DetectionConfig(scale="n", pretrained=False), tmp_path / "c"), weights) > 0
    with pytest.raises(FileNotFoundError, match="detection.pretrained_path: no such file"):
        build_detector(DetectionConfig(scale="n", pretrained_path=str(tmp_path / "missing.pt")), tmp_path / "d")
