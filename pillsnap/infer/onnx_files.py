"""ONNX files: classifier export, optional onnxslim pass, PillSnap metadata, shapes and sizes for the report.

The classifier's label space (its K-codes in output order, and their hash) is stored in the ONNX file's metadata,
so an ONNX-only deployment maps logits to K-codes without the torch checkpoint and can be checked against the
global class map.
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)
META_PREFIX = "pillsnap."


def export_classifier_onnx(model: torch.nn.Module, path: Path, image_size: int, opset: int,
                           dynamic_batch: bool) -> Path:
    """The classifier as ONNX: input `images` (B, 3, S, S) normalised float32, output `logits` (B, K)."""
    exportable = copy.deepcopy(model).float().cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # same exporter as the detector's (dynamo=True would need onnxscript)
        torch.onnx.export(exportable, torch.zeros(1, 3, image_size, image_size), str(path), opset_version=opset,
                          dynamo=False, input_names=["images"], output_names=["logits"], dynamic_axes=axes)
    return path


def slim_in_place(path: Path) -> str:
    """Run onnxslim when it is installed; the parity check always runs on the file as finally written."""
    try:
        import onnx
        import onnxslim
    except ImportError:
        return "skipped: onnxslim not installed"
    try:
        slimmed = onnxslim.slim(onnx.load(str(path)))
    except Exception as e:  # an optimiser bug must not cost the export: keep the plain graph and say so
        log.warning("onnxslim failed on %s (%s: %s); keeping the unslimmed graph", path, type(e).__name__, e)
        return f"failed: {type(e).__name__}: {e}"
    onnx.save(slimmed, str(path))
    return "applied"


def write_metadata(path: Path, values: Mapping[str, object]) -> None:
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    onnx.save(model, str(path))


def read_metadata(path: Path) -> Dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def io_shapes(path: Path) -> Dict[str, Dict[str, List]]:
    """{"inputs": {name: shape}, "outputs": {name: shape}}; a dynamic axis appears by its name (e.g. "batch")."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def shape(value) -> List:
        dims = value.type.tensor_type.shape.dim
        return [d.dim_param or d.dim_value for d in dims]

    initialisers = {i.name for i in graph.initializer}
    return {"inputs": {v.name: shape(v) for v in graph.input if v.name not in initialisers},
            "outputs": {v.name: shape(v) for v in graph.output}}


def onnx_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: Optional[int] = None):
    """An ONNX Runtime session; `threads` caps intra-op threads (None = ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path} (run `pillsnap export --stage N` first)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
