"""The stage report as markdown (the v3 lessons' training-report template: overview, configuration,
results, lessons, next actions). Pure: takes the stage's small result dicts, returns text."""
from __future__ import annotations

from typing import Dict, List, Optional


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "not measured"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def targets_table(go_no_go: Dict) -> str:
    rows = ["| check | measured | target | status |", "|---|---|---|---|"]
    for c in go_no_go.get("checks", []):
        rows.append(f"| {c['name']} | {_num(c['measured'])} | {c['comparison']} {_num(c['target'])} | {c['status']} |")
    return "\n".join(rows)


def _lessons(train: Dict, evaluation: Dict, subset: Dict) -> List[str]:
    out = []
    if train.get("resumed_from_step"):
        out.append(f"Training resumed from global step {train['resumed_from_step']} (checkpoint recovery worked).")
    if train.get("stopped_early"):
        out.append(f"Early stopping fired at epoch {train['epochs_completed']} (best epoch {train['best_epoch']}).")
    if train.get("skipped_samples"):
        out.append(f"{train['skipped_samples']} unreadable samples were skipped by the loader.")
    worst = evaluation.get("worst_classes") or []
    if worst:
        out.append("Weakest classes: " + ", ".join(f"{w['class']} (F1 {w['f1']:.2f})" for w in worst[:5]) + ".")
    out += [f"Subset note: {n}" for n in subset.get("notes", [])]
    return out or ["No incidents."]


def render_stage_report(stage: int, subset: Dict, train: Dict, evaluation: Dict, go_no_go: Dict, advice: Dict,
                        paths: Dict[str, str], config_summary: Dict[str, str],
                        detection: Optional[Dict] = None) -> str:
    lines = [
        f"# PillSnap Stage {stage} report", "",
        "## Overview",
        f"- decision: **{go_no_go.get('decision')}** ({', '.join(go_no_go.get('reasons') or []) or 'all checks passed'})",
        f"- advisor: **{advice.get('recommendation')}** — {advice.get('message', '')}",
        f"- data actually used: {subset['classes']} classes (asked {subset.get('classes_requested')}); "
        f"train {subset['train_single']} single + {subset['train_combination']} combination images, "
        f"val {subset['val_single']} single + {subset['val_combination']} combination images",
        "", "## Configuration",
    ]
    lines += [f"- {k}: `{v}`" for k, v in config_summary.items()]
    lines += [
        "", "## Results",
        f"- classifier: accuracy {_num(evaluation.get('accuracy'))}, macro-F1 {_num(evaluation.get('macro_f1'))}, "
        f"top-5 {_num(evaluation.get('top5'))}, n={evaluation.get('n')}, "
        f"p95 latency {_num(evaluation.get('latency_p95_ms'), 1)} ms",
        f"- training: {train.get('epochs_completed')} epochs, {train.get('global_step')} optimizer steps, "
        f"best {train.get('monitor')} {_num(train.get('best_metric'))} at epoch {train.get('best_epoch')}, "
        f"mean throughput {_num(train.get('mean_throughput'), 1)} img/s ({train.get('policy')})",
    ]
    if detection:
        lines.append(f"- detector: mAP@0.5 {_num(detection.get('mAP_0.5'))}, "
                     f"mAP@0.5:0.95 {_num(detection.get('mAP_0.5_0.95'))}")
    lines += ["", "### Go/No-Go checks", targets_table(go_no_go), "", "## Lessons"]
    lines += [f"- {item}" for item in _lessons(train, evaluation, subset)]
    lines += ["", "## Next actions"]
    lines += [f"- option `{o['id']}`: {o['label']}" for o in advice.get("options", [])]
    lines += [f"- try `{s['key']}={s['value']}` — {s['why']}" for s in advice.get("suggestions", [])[:5]]
    lines += ["", "## Files"] + [f"- {k}: `{v}`" for k, v in paths.items()]
    return "\n".join(lines) + "\n"
