"""Activation verification for NPU-friendly detectors (v3 lessons: "verify, don't trust the yaml").

A yaml that names relu but lacks the top-level `activation:` key builds a SiLU model without a word of warning.
So the built model is checked before training, and an exported ONNX graph can be checked before deployment:

- torch: count activation modules over every reference (ultralytics shares ONE activation instance across all
  Convs, so de-duplicated module counts read 1). For relu / leaky_relu, NO SiLU may remain anywhere.
- ONNX: count op types. SiLU exports as a Sigmoid whose output is multiplied by its own input (a Sigmoid+Mul
  pair); the head's lone class-score Sigmoid is not a pair and is not counted. ReLU is `Relu`, LeakyReLU `LeakyRelu`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import torch.nn as nn

EXPECTED_MODULE = {"silu": nn.SiLU, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}
EXPECTED_ONNX_OP = {"silu": "SiLU(Sigmoid+Mul)", "relu": "Relu", "leaky_relu": "LeakyRelu"}


class ActivationVerificationError(RuntimeError):
    """The model does not use the activation the configuration asked for."""


@dataclass
class ActivationReport:
    asked: str
    counts: Dict[str, int] = field(default_factory=dict)  # activation name -> occurrences
    source: str = "torch"

    def as_dict(self) -> Dict:
        return {"asked": self.asked, "counts": dict(self.counts), "source": self.source}


def torch_activation_counts(model: nn.Module) -> Dict[str, int]:
    """Occurrences of each activation class, counting a shared instance once per place it is used."""
    kinds = (nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Mish)
    counts: Counter = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, kinds):
            counts[type(module).__name__] += 1
    return dict(counts)


def verify_torch_activations(model: nn.Module, asked: str) -> ActivationReport:
    if asked not in EXPECTED_MODULE:
        raise ValueError(f"detection.activation={asked!r} is not one of {sorted(EXPECTED_MODULE)}")
    counts = torch_activation_counts(model)
    report = ActivationReport(asked, counts, "torch")
    wanted = EXPECTED_MODULE[asked].__name__
    if counts.get(wanted, 0) == 0:
        raise ActivationVerificationError(
            f"detection.activation={asked!r} did not apply: the model has no {wanted} module (found {counts}). "
            f"Does the model yaml carry the top-level `activation:` key?")
    if asked != "silu" and counts.get("SiLU", 0):
        raise ActivationVerificationError(
            f"detection.activation={asked!r} did not apply everywhere: {counts['SiLU']} SiLU activation(s) remain "
            f"(found {counts}). The yaml's top-level `activation:` key is missing or was not read.")
    return report


def onnx_activation_counts(onnx_path: Path | str) -> Dict[str, int]:
    """SiLU pairs, Relu and LeakyRelu ops (plus lone Sigmoids) in an ONNX graph, sub-graphs included."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = list(_all_nodes(graph))
    sigmoid_io = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Sigmoid"}
    silu = sum(1 for n in nodes if n.op_type == "Mul" and _is_silu_mul(n, sigmoid_io))
    ops = Counter(n.op_type for n in nodes)
    return {"SiLU": silu, "Relu": ops.get("Relu", 0), "LeakyRelu": ops.get("LeakyRelu", 0),
            "Sigmoid": ops.get("Sigmoid", 0) - silu}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _all_nodes(attr.g)


def _is_silu_mul(node, sigmoid_io: Dict[str, str]) -> bool:
    a, b = (list(node.input) + ["", ""])[:2]
    return (a in sigmoid_io and sigmoid_io[a] == b) or (b in sigmoid_io and sigmoid_io[b] == a)


def verify_onnx_activations(onnx_path: Path | str, asked: str) -> ActivationReport:
    if asked not in EXPECTED_ONNX_OP:
        raise ValueError(f"detection.activation={asked!r} is not one of {sorted(EXPECTED_ONNX_OP)}")
    counts = onnx_activation_counts(onnx_path)
    report = ActivationReport(asked, counts, f"onnx:{onnx_path}")
    key = {"silu": "SiLU", "relu": "Relu", "leaky_relu": "LeakyRelu"}[asked]
    if counts[key] == 0:
        raise ActivationVerificationError(
            f"{onnx_path}: detection.activation={asked!r} but the graph has no {EXPECTED_ONNX_OP[asked]} "
            f"(found {counts})")
    if asked != "silu" and counts["SiLU"]:
        raise ActivationVerificationError(
            f"{onnx_path}: detection.activation={asked!r} but {counts['SiLU']} SiLU (Sigmoid+Mul) pair(s) remain "
            f"(found {counts})")
    return report
