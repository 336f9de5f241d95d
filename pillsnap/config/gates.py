"""The gates a stage is judged by, and how the applied ones differ from the shipped `configs/pillsnap.yaml`.

A gate is any setting that decides whether a stage passes, what counts as evidence, or what the unattended policy
may approve: the stage's Go/No-Go thresholds (data.stages.N), its mandatory checks and targets
(evaluation.stages.N), the checks' bounds and the attested list (evaluation.checks), the advisor's scoring and
critical-failure bounds, and the unattended policy. Each decision records the gates it applied and every
difference from the shipped file for that stage (key, shipped, applied, direction), so a gate loosened on the
command line or in a profile is on the record, and the final verdict lists it as an override.

Direction: `looser` (a lower minimum, a higher maximum, a mandatory check or a target dropped, a check moved to a
person's word, a policy that proceeds where the shipped one stops), `tighter` (the opposite), `changed` (no
order: a target's comparison turned around). `looser` and `changed` are overrides; `tighter` is not (the ledger's
StageRecord.gates_loosened reads them so).
"""
from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache
from typing import Any, Dict, List

from pillsnap.config.schema import PillSnapConfig

STAGE_GATES = ("min_accuracy", "max_latency_ms", "min_coverage", "min_eval_samples", "max_acc_drop", "epsilon_acc",
               "max_lost_classes")
# The advisor's keys that decide a recommendation (its scoring and its critical failures), not its wording.
ADVISOR_GATES = ("max_repeated_oom", "max_data_corruption_rate", "gpu_memory_high_gb", "max_data_to_compute_ratio",
                 "max_data_loading_s", "max_class_imbalance_ratio")
LOOSER, TIGHTER, CHANGED = "looser", "tighter", "changed"
# Bounds whose name does not say their direction: a larger value asks for less.
LARGER_IS_LOOSER = {"epsilon_acc", "gpu_memory_high_gb", "max_lost_classes"}
# Sizes of the evidence a check reads: fewer photos is weaker evidence.
LARGER_IS_TIGHTER = {"multi_batch_photos"}


def stage_gates(cfg: PillSnapConfig, stage: int) -> Dict[str, Any]:
    """{dotted key: value} of every gate a decision on `stage` applies (a target as "op value", keyed by its
    metric; a list of checks as a sorted list)."""
    spec = cfg.stage(stage)
    gates: Dict[str, Any] = {f"data.stages.{stage}.{k}": getattr(spec, k) for k in STAGE_GATES}
    criteria = cfg.evaluation.stages.get(stage)
    gates[f"evaluation.stages.{stage}.mandatory_checks"] = sorted(criteria.mandatory_checks) if criteria else []
    for kind in ("targets", "advanced"):
        for t in (getattr(criteria, kind) if criteria else []):
            gates[f"evaluation.stages.{stage}.{kind}.{t.metric}"] = f"{t.op} {t.value:g}"
    for key, value in asdict(cfg.evaluation.checks).items():
        gates[f"evaluation.checks.{key}"] = sorted(value) if isinstance(value, list) else value
    for key in ADVISOR_GATES:
        gates[f"evaluation.advisor.{key}"] = getattr(cfg.evaluation.advisor, key)
    for key, value in asdict(cfg.evaluation.recommendation).items():
        gates[f"evaluation.recommendation.{key}"] = value
    for level, choice in sorted(cfg.orchestration.unattended_policy.items()):
        gates[f"orchestration.unattended_policy.{level}"] = choice
    return gates


@lru_cache(maxsize=8)
def _shipped(stage: int) -> Dict[str, Any]:
    """The shipped file's gates for the stage (as it is in this checkout); read once, never modified."""
    from pillsnap.config.load import load_config

    shipped = load_config()
    return stage_gates(shipped, stage) if stage in shipped.data.stages else {}


def gate_differences(applied: Dict[str, Any], shipped: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every gate whose applied value is not the shipped one: {key, shipped, applied, direction}."""
    out = []
    for key in sorted(set(applied) | set(shipped)):
        a, s = applied.get(key), shipped.get(key)
        if a != s:
            out.append({"key": key, "shipped": s, "applied": a, "direction": _direction(key, s, a)})
    return out


def gates_record(cfg: PillSnapConfig, stage: int) -> Dict[str, Any]:
    """What a decision records of its gates: every one applied, and its differences from the shipped file."""
    applied = stage_gates(cfg, stage)
    return {"applied": applied, "differences": gate_differences(applied, _shipped(stage))}


def describe_gate(difference: Dict[str, Any]) -> str:
    return f"{difference['key']}: {difference['shipped']!r} shipped, {difference['applied']!r} applied " \
           f"({difference['direction']})"


def _direction(key: str, shipped: Any, applied: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if ".targets." in key or ".advanced." in key:
        return _target_direction(shipped, applied)
    if isinstance(shipped, list) or isinstance(applied, list):
        dropped, added = set(shipped or []) - set(applied or []), set(applied or []) - set(shipped or [])
        # a mandatory check dropped asks less; a check moved to the attested list becomes a person's word
        more_attested = leaf == "attested" and added
        fewer_mandatory = leaf == "mandatory_checks" and dropped
        return LOOSER if more_attested or fewer_mandatory else TIGHTER
    if ".unattended_policy." in key:
        return LOOSER if applied == "proceed" else TIGHTER
    if shipped is None or applied is None:  # a bound switched off is looser; one switched on is tighter
        return LOOSER if applied is None else TIGHTER
    if not isinstance(shipped, (int, float)) or not isinstance(applied, (int, float)):
        return CHANGED
    larger_asks_less = leaf in LARGER_IS_LOOSER or (leaf.startswith("max_") and leaf not in LARGER_IS_TIGHTER)
    larger_asks_more = leaf in LARGER_IS_TIGHTER or leaf.startswith("min_") or leaf.endswith("_min_score")
    if not (larger_asks_less or larger_asks_more):
        return CHANGED
    return LOOSER if (applied > shipped) == larger_asks_less else TIGHTER


def _target_direction(shipped: Any, applied: Any) -> str:
    if applied is None:
        return LOOSER  # a target dropped
    if shipped is None:
        return TIGHTER  # a target added
    (s_op, s_value), (a_op, a_value) = shipped.split(), applied.split()
    if s_op != a_op:
        return CHANGED
    lower = float(a_value) < float(s_value)
    return LOOSER if lower == (s_op == ">=") else TIGHTER
