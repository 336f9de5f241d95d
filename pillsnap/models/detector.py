"""The detector: YOLO11 with one class "pill", built from ultralytics' packaged yaml at the configured scale.

Naming rule (one rule, parsed both ways): the generated model file is called

    yolo11{scale}-{activation}.yaml      scale in n|s|m|l|x, activation in silu|relu|leaky_relu

and its stem ("yolo11n-relu") is the detector's `backbone` in every checkpoint. Ultralytics reads the scale from the
FILE NAME (not from a key), so the name is not cosmetic: a misspelt name silently builds the wrong model. That is
why a name that does not follow the rule is rejected, never guessed (an earlier project lost a run to `leaked.yaml`
vs `leaky.yaml`). For relu / leaky_relu the yaml gets the top-level `activation:` key that replaces every Conv's
activation; `pillsnap.models.activations` verifies that it really did.

Ultralytics is imported lazily: it fixes its settings folder (YOLO_CONFIG_DIR, set at the entry points) at import.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import yaml

from pillsnap.config import DetectionConfig
from pillsnap.models.pretrained import Reachable, load_matching, probe, unavailable

log = logging.getLogger(__name__)

SCALES = ("n", "s", "m", "l", "x")
ACTIVATION_KEYS: Dict[str, Optional[str]] = {"silu": None, "relu": "nn.ReLU()", "leaky_relu": "nn.LeakyReLU(0.1)"}
NAMING_RULE = "yolo11{scale}-{activation}.yaml (scale: n|s|m|l|x; activation: silu|relu|leaky_relu)"
_NAME = re.compile(r"^yolo11(?P<scale>[a-z]*)-(?P<activation>[a-z_]+)$")
PILL_CLASSES = ["pill"]
# The detector's label space is the one class "pill"; its hash fills check_compatible's class-map slot.
GITHUB_HOST = "github.com"
DETECTOR_CLASS_MAP_HASH = hashlib.sha256(json.dumps(PILL_CLASSES).encode()).hexdigest()[:16]


class DetectorNameError(ValueError):
    """A detector model name or file name does not follow the naming rule."""


@dataclass(frozen=True)
class DetectorName:
    scale: str
    activation: str

    @property
    def stem(self) -> str:
        return f"yolo11{self.scale}-{self.activation}"

    @property
    def file_name(self) -> str:
        return f"{self.stem}.yaml"


def model_file_name(scale: str, activation: str) -> str:
    """The one file name for (scale, activation); raises DetectorNameError for values outside the rule."""
    return parse_model_name(f"yolo11{scale}-{activation}").file_name


def backbone_name(cfg: DetectionConfig) -> str:
    """The detector's `backbone` in checkpoints: the model file stem, e.g. yolo11m-silu."""
    return parse_model_name(f"yolo11{cfg.scale}-{cfg.activation}").stem


def parse_model_name(name: str | Path) -> DetectorName:
    """Parse a model file name or stem back into (scale, activation), or say exactly what is wrong with it."""
    stem = Path(str(name)).name
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    match = _NAME.match(stem)
    if not match:
        raise DetectorNameError(f"detector model name {str(name)!r} does not follow the naming rule {NAMING_RULE}")
    scale, activation = match["scale"], match["activation"]
    if scale not in SCALES:
        raise DetectorNameError(f"detector model name {str(name)!r}: scale {scale!r} is not one of {'|'.join(SCALES)}"
                                f" (naming rule {NAMING_RULE})")
    if activation not in ACTIVATION_KEYS:
        close = difflib.get_close_matches(activation, list(ACTIVATION_KEYS), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DetectorNameError(f"detector model name {str(name)!r}: activation {activation!r} is not one of "
                                f"{'|'.join(ACTIVATION_KEYS)}{hint} (naming rule {NAMING_RULE})")
    return DetectorName(scale, activation)


def packaged_yolo11_yaml() -> Dict[str, Any]:
    import ultralytics

    path = Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml"
    return yaml.safe_load(path.read_text())


def model_yaml_dict(cfg: DetectionConfig, nc: int = 1) -> Dict[str, Any]:
    name = parse_model_name(f"yolo11{cfg.scale}-{cfg.activation}")
    spec = packaged_yolo11_yaml()
    spec["nc"] = nc
    act = ACTIVATION_KEYS[name.activation]
    if act:
        spec = {"activation": act, **spec}  # top level, first, so a reader sees it
    return spec


def write_model_yaml(cfg: DetectionConfig, out_dir: Path, nc: int = 1) -> Path:
    """Write the generated model yaml under its rule-following name; rewritten only when its content changes."""
    path = Path(out_dir) / model_file_name(cfg.scale, cfg.activation)
    text = yaml.safe_dump(model_yaml_dict(cfg, nc), sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def build_from_yaml(path: Path | str | Dict[str, Any], verbose: bool = False) -> torch.nn.Module:
    """A DetectionModel from a rule-following yaml file (or the yaml dict a checkpoint carries)."""
    from ultralytics.nn.tasks import DetectionModel

    if not isinstance(path, dict):
        parse_model_name(path)  # the scale is read from the name: refuse names that break the rule
        if not Path(path).is_file():
            raise FileNotFoundError(f"detector model yaml not found: {path}")
        path = str(path)
    return DetectionModel(path, nc=None, verbose=verbose)


def transfer_pretrained(model: torch.nn.Module, weights_path: str | Path) -> int:
    """Copy every tensor whose name and shape match from a local file (ultralytics .pt or a PillSnap checkpoint).

    The activation swap (relu / leaky_relu) has no weights, so every convolution and norm still fits; only the
    80-class COCO head rows are left fresh for the one class "pill".
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"detection.pretrained_path: no such file {path}")
    return load_matching(model, _pretrained_state(path), str(path))


def _pretrained_state(path: Path) -> Dict[str, torch.Tensor]:
    from pillsnap.core.checkpoints import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)["model"]  # ours: plain tensors, weights_only
    except CheckpointError:
        pass
    from ultralytics.nn.tasks import load_checkpoint as load_ultralytics  # its restricted unpickler

    try:
        source, _ = load_ultralytics(path)
    except Exception as e:  # any unreadable file ends up here: say which file and why
        raise ValueError(f"detection.pretrained_path={path}: neither a PillSnap nor an ultralytics checkpoint "
                         f"({type(e).__name__}: {e})") from None
    return source.float().state_dict()


def _yolo_weights(cfg: DetectionConfig, reachable: Optional[Reachable]) -> Tuple[Path, bool]:
    """(the COCO weights file for detection.pretrained, whether it must be downloaded first); raises (naming the
    key and the ways out) when it cannot be had."""
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"detection.pretrained_path: no such file {path}")
        return path, False
    from ultralytics.utils import SETTINGS

    name = f"yolo11{cfg.scale}.pt"
    cached = Path(SETTINGS["weights_dir"]) / name
    if cached.is_file():
        return cached, False
    if not probe(reachable)(GITHUB_HOST):
        raise unavailable("detection", f"ultralytics {name}", GITHUB_HOST)
    return cached, True


def detector_weights_source(cfg: DetectionConfig, reachable: Optional[Reachable] = None) -> str:
    """Where detection.pretrained's weights will come from, checked without downloading (the environment check)."""
    if not cfg.enabled or not cfg.pretrained:
        return "none (detection.enabled or detection.pretrained is false)"
    path, download = _yolo_weights(cfg, reachable)
    if download:
        return f"download of {path.name}"
    return f"{'local file' if cfg.pretrained_path else 'cache'} {path}"


def pretrained_weights(cfg: DetectionConfig, reachable: Optional[Reachable] = None) -> Optional[Path]:
    """The COCO weights file for detection.pretrained (yolo11{scale}.pt), downloaded when missing and online."""
    if not cfg.pretrained:
        return None
    path, download = _yolo_weights(cfg, reachable)
    if download:
        from ultralytics.utils.downloads import attempt_download_asset

        log.info("detector: downloading %s into %s", path.name, path.parent)
        return Path(attempt_download_asset(path))
    return path


def build_detector(cfg: DetectionConfig, model_dir: Path, verbose: bool = False, pretrained: Optional[bool] = None,
                   reachable: Optional[Reachable] = None) -> torch.nn.Module:
    """Generated yaml -> model -> pretrained weights (detection.pretrained) -> activation check (before training)."""
    from pillsnap.models.activations import verify_torch_activations

    model = build_from_yaml(write_model_yaml(cfg, model_dir), verbose=verbose)
    weights = pretrained_weights(cfg, reachable) if (cfg.pretrained if pretrained is None else pretrained) else None
    if weights is not None:
        transfer_pretrained(model, weights)
    else:
        log.info("detector %s: training from scratch (no pretrained weights)", backbone_name(cfg))
    verify_torch_activations(model, cfg.activation)
    return model


def verify_detector(cfg: DetectionConfig, model_dir: Path) -> Dict[str, Any]:
    """Pre-training check for an orchestration task: the rule-named yaml builds, and its activation applied.

    Raises DetectorNameError / ActivationVerificationError; returns a small report dict otherwise.
    """
    from pillsnap.models.activations import verify_torch_activations

    model = build_detector(cfg, model_dir, pretrained=False)  # the architecture is checked, no download needed
    report = verify_torch_activations(model, cfg.activation)
    return {"backbone": backbone_name(cfg), "model_yaml": str(Path(model_dir) / model_file_name(cfg.scale,
                                                                                                cfg.activation)),
            "scale": model.yaml.get("scale"), "parameters": sum(p.numel() for p in model.parameters()),
            "activation": report.as_dict()}


def detector_payload(model: torch.nn.Module, backbone: str, image_size: int, **extra: Any) -> Dict[str, Any]:
    """Our checkpoint schema for a detector: plain tensors and strings only, so weights_only loading works."""
    spec = getattr(model, "yaml", None)
    return {"model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "model_yaml": json.dumps(spec, default=str), "backbone": backbone, "num_classes": 1,
            "class_map_hash": DETECTOR_CLASS_MAP_HASH, "classes": list(PILL_CLASSES), "image_size": image_size,
            **extra}


def load_detector_checkpoint(path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A DetectionModel from one of our detector checkpoints (best.pt / last.pt), in eval mode."""
    from pillsnap.core.checkpoints import load_checkpoint
    from pillsnap.models.activations import verify_torch_activations

    payload = load_checkpoint(path)
    name = parse_model_name(str(payload.get("backbone")))
    model = build_from_yaml(json.loads(payload["model_yaml"]))
    model.load_state_dict(payload["model"])
    verify_torch_activations(model, name.activation)
    return model.to(device).eval()



def export_detector_onnx(model: torch.nn.Module, path: Path, image_size: int, opset: int = 17,
                         dynamic_batch: bool = True) -> Path:
    """ONNX with the raw head output (B, 4+nc, N): NMS stays outside the graph, shared with the torch path."""
    import copy
    import warnings

    exportable = copy.deepcopy(model).float().cpu().eval()
    head = exportable.model[-1]
    head.export, head.format = True, "onnx"  # the head then returns the decoded tensor alone
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; the dynamo one needs onnxscript
        torch.onnx.export(exportable, torch.zeros(1, 3, image_size, image_size), str(path), opset_version=opset,
                          dynamo=False, input_names=["images"], output_names=["output0"], dynamic_axes=axes)
    return path
