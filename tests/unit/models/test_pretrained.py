"""Pretrained weights: a local file keeps every tensor that fits; the hub cache is used without a download;
offline without the weights is ONE clear error naming the key and both ways out, at once."""
import time

import pytest
import torch

from pillsnap.config import ClassificationConfig, DetectionConfig
from pillsnap.models.classifier import build_classifier
from pillsnap.models.detector import build_detector
from pillsnap.models.pretrained import PretrainedWeightsUnavailable

OFFLINE = lambda host: False  # noqa: E731 - the network probe, answered "unreachable"


def _classifier_cfg(**kw):
    return ClassificationConfig(backbone="test_efficientnet", image_size=32, drop_rate=0.0, drop_path_rate=0.0, **kw)


def test_a_local_classifier_file_reproduces_the_model(tmp_path):
    source = build_classifier(_classifier_cfg(pretrained=False), 6).eval()
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    loaded = build_classifier(_classifier_cfg(pretrained_path=str(tmp_path / "weights.pth")), 6).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source(x), loaded(x))


def test_a_local_file_with_another_head_keeps_the_backbone(tmp_path):
    source = build_classifier(_classifier_cfg(pretrained=False), 1000)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "imagenet.pth")
    loaded = build_classifier(_classifier_cfg(pretrained_path=str(tmp_path / "imagenet.pth")), 6)
    stem = next(k for k in source.state_dict() if k.startswith("conv_stem"))
    assert torch.equal(loaded.state_dict()[stem], source.state_dict()[stem])
    assert loaded.get_classifier().out_features == 6


def test_offline_without_cached_classifier_weights_is_one_clear_error_at_once(monkeypatch):
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: None)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_classifier(_classifier_cfg(), 6, reachable=OFFLINE)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "classification.pretrained=true" in message and "classification.pretrained_path=" in message
    assert "classification.pretrained=false" in message and "huggingface.co" in message


def test_cached_hub_weights_load_without_the_network(tmp_path, monkeypatch):
    source = build_classifier(_classifier_cfg(pretrained=False), 1000)
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache",
                        lambda repo, name: str(tmp_path / "model.safetensors") if name == "model.safetensors" else None)
    loaded = build_classifier(_classifier_cfg(), 6, reachable=lambda host: pytest.fail("no probe when cached"))
    stem = next(k for k in source.state_dict() if k.startswith("conv_stem"))
    assert torch.equal(loaded.state_dict()[stem], source.state_dict()[stem])


def test_a_local_yolo_file_keeps_every_weight_through_the_activation_swap(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from pillsnap.models.detector import packaged_yolo11_yaml

    coco = DetectionModel({**packaged_yolo11_yaml(), "nc": 80, "scale": "n"}, verbose=False)  # a COCO-shaped model
    torch.save({"model": coco}, tmp_path / "yolo11n.pt")
    relu = build_detector(DetectionConfig(scale="n", activation="relu", pretrained_path=str(tmp_path / "yolo11n.pt")),
                          tmp_path / "model")
    mine, theirs = relu.state_dict(), coco.state_dict()
    same = [k for k in mine if k in theirs and mine[k].shape == theirs[k].shape]
    assert all(torch.equal(mine[k].float(), theirs[k].float()) for k in same)
    head_only = sorted({k.split(".")[1] for k in mine if k not in same})
    assert head_only == ["23"]  # only the detection head's class rows (80 COCO classes -> 1 pill) start fresh


def test_offline_without_yolo_weights_is_one_clear_error(tmp_path, monkeypatch):
    from ultralytics.utils import SETTINGS

    monkeypatch.setitem(SETTINGS, "weights_dir", str(tmp_path / "weights"))
    with pytest.raises(PretrainedWeightsUnavailable, match=r"detection.pretrained=true: ultralytics yolo11n.pt .*"
                                                           r"detection.pretrained_path=.*detection.pretrained=false"):
        build_detector(DetectionConfig(scale="n"), tmp_path / "model", reachable=OFFLINE)
