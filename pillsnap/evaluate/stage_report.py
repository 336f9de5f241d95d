"""The stage report as markdown (the v3 lessons' training-report template: overview, configuration,
results, checks, pictures, lessons, next actions). Pure: takes the stage's small result dicts, returns text.

Pictures go through `picture(title, path)`: a relative link in the report file, an embedded thumbnail in the
Prefect artifact (the UI cannot open files on the training machine).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Callable, Dict, List, Optional

Picture = Callable[[str, str], str]


def _detector_split(facts: Dict, split: str) -> str:
    kinds = (facts.get("composition") or {}).get(split) or {}
    mix = " + ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return (f"{split} {(facts.get('images') or {}).get(split)} photos ({mix or 'composition not recorded'}), "
            f"{(facts.get('boxes') or {}).get(split)} boxes")


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "not measured"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def targets_table(go_no_go: Dict) -> str:
    rows = ["| check | measured | target | status |", "|---|---|---|---|"]
    for c in go_no_go.get("rows", []):
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


def checks_table(checks: Dict[str, Dict]) -> str:
    rows = ["| check | status | mandatory | definition |", "|---|---|---|---|"]
    rows += [f"| `{name}` | {c['status']}{' — ' + c['detail'] if c.get('detail') else ''} | "
             f"{'yes' if c['mandatory'] else ''} | {c['definition']} |" for name, c in checks.items()]
    return "\n".join(rows)


def linked(report_dir: Path) -> Picture:
    return lambda title, path: f"![{title}]({Path(path).resolve().relative_to(report_dir.resolve())})"


def embedded(max_side: int = 480) -> Picture:
    """A PNG thumbnail as a data URI."""
    from PIL import Image

    def picture(title: str, path: str) -> str:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
        return f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
    return picture


def _pictures(evaluation: Dict, detection: Optional[Dict], picture: Picture) -> List[str]:
    shown = [(title, path) for title, path in (evaluation.get("pictures") or {}).items()]
    drawings = ((detection or {}).get("combination") or {}).get("drawings") or []
    shown += [(f"detections {i + 1} (green: named right, red: wrong, white: truth)", p) for i, p in enumerate(drawings)]
    return [picture(title, path) for title, path in shown if Path(path).is_file()] or ["No pictures were made."]


def _decision_line(decision: Dict) -> str:
    who = decision.get("chosen_by")
    if who == "human":
        who = f"{decision.get('reviewer') or 'an unnamed person'} (a person)"
    line = f"- choice: **{decision.get('choice')}** by {who}"
    if decision.get("override"):
        line += " — **override** of: " + "; ".join(decision.get("overridden") or [])
    if decision.get("stop_reason"):
        line += f" — stopped: {decision['stop_reason']}"
    return line + f" (approved: {decision.get('approved')})"


def _checks_line(checks: Optional[Dict[str, Dict]]) -> str:
    """Every stage check that did not pass, named: never "all passed" beside one that did not."""
    if not checks:
        return "- stage checks: not measured"
    short = [f"`{name}` {c['status']}" for name, c in checks.items() if c["status"] not in ("pass", "attested")]
    return f"- stage checks not passing: {', '.join(short)}" if short else "- every stage check passed or was attested"


def _judged_lines(decision: Dict) -> List[str]:
    """What the decision judged (the models by sha256) and the gates it applied looser than the shipped config."""
    models = ", ".join(f"{m} `{sha[:12]}`" for m, sha in (decision.get("models") or {}).items() if sha)
    lines = [f"- judged: {models}"] if models else []
    loose = decision.get("gates_loosened") or []
    if loose:
        lines.append("- gates looser than the shipped configs/pillsnap.yaml: " + "; ".join(
            f"`{d['key']}` {d['shipped']!r} shipped, {d['applied']!r} applied" for d in loose))
    return lines


def _regression_line(evaluation: Dict, go_no_go: Dict) -> List[str]:
    row = next((c for c in go_no_go.get("rows") or [] if c.get("name") == "accuracy_regression"), None)
    previous = evaluation.get("previous_stage_val") or {}
    if row is None:
        return []
    if row["status"] == "skipped":
        return [f"- regression guard: skipped ({row.get('detail')})"]
    return [f"- regression guard: {row['status']}: this model {_num(previous.get('accuracy'))} on the previous "
            f"stage's {previous.get('photos', 0)} val photos, floor {_num(row.get('target'))} ({row.get('detail')})"]


def _attestation_lines(checks: Optional[Dict[str, Dict]]) -> List[str]:
    lines = []
    for name, c in (checks or {}).items():
        if c["status"] in ("attested", "unattested", "not_applicable"):
            lines.append(f"- `{name}`: {c['status']} — {c.get('detail', '')}")
    return lines


def _detection_lines(detection: Dict) -> List[str]:
    # metric names in code spans: "mAP@0.5" as plain text is a mail link in the Prefect UI's markdown
    lines = [f"- detector on {detection.get('measured_on', 'validation combination photos')}: `mAP@0.5` "
             f"{_num(detection.get('mAP_0.5'))}, `mAP@0.5:0.95` {_num(detection.get('mAP_0.5_0.95'))}"
             f", precision {_num(detection.get('precision'))}, recall {_num(detection.get('recall'))}"]
    singles = detection.get("single_photos") or {}
    if singles:
        lines.append(f"- detector on {singles.get('n_images')} validation single photos (reported apart): `mAP@0.5` "
                     f"{_num(singles.get('mAP_0.5'))}, recall {_num(singles.get('recall'))}")
    pipeline = (detection.get("combination") or {}).get("pipeline_latency") or {}
    if pipeline:
        lines.append(f"- whole pipeline (auto mode, batch 1, serving device): p50 {_num(pipeline.get('p50'), 1)} ms, "
                     f"p95 {_num(pipeline.get('p95'), 1)} ms over {pipeline.get('photos')} val photos")
    facts = detection.get("trained_on") or {}
    if facts:
        lines.append(f"- detector data ({facts.get('data_yaml')}): {_detector_split(facts, 'train')}; "
                     f"{_detector_split(facts, 'val')}; cap {facts.get('cap')}")
    combo = detection.get("combination") or {}
    if combo.get("measured"):
        lines.append(f"- combination photos ({combo['images']} val photos, {combo['pills']} pills, "
                     f"{combo['pills_out_of_scope']} outside this stage's classes): detection recall "
                     f"{_num(combo['detection_recall'])}, precision {_num(combo['detection_precision'])}, "
                     f"per-pill accuracy {_num(combo['per_pill_accuracy'])} (in-scope pills)")
    elif combo:
        lines.append(f"- combination photos: not measured ({combo.get('reason')})")
    return lines


def render_stage_report(stage: int, subset: Dict, train: Dict, evaluation: Dict, go_no_go: Dict, advice: Dict,
                        paths: Dict[str, str], config_summary: Dict[str, str], detection: Optional[Dict] = None,
                        checks: Optional[Dict[str, Dict]] = None, decision: Optional[Dict] = None,
                        picture: Optional[Picture] = None) -> str:
    lines = [
        f"# PillSnap Stage {stage} report", "",
        "## Overview",
        f"- Go/No-Go: **{go_no_go.get('decision')}** "
        f"({', '.join(go_no_go.get('reasons') or []) or 'every row passed'})",
        _checks_line(checks),
        f"- advisor: **{advice.get('recommendation')}** — {advice.get('message', '')}",
        *([_decision_line(decision), *_judged_lines(decision)] if decision else []),
        f"- data actually used: {subset['classes']} classes (asked {subset.get('classes_requested')}); "
        f"train {subset['train_single']} single + {subset['train_combination']} combination images, "
        f"val {subset['val_single']} single ({subset.get('val_per_class')} per class at most, gate min_eval_samples "
        f"{subset.get('min_eval_samples')}) + {subset['val_combination']} combination images",
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
        f"mean throughput {_num(train.get('mean_throughput'), 1)} img/s on {train.get('world_size', 1)} "
        f"process(es) ({train.get('policy')})",
    ]
    lines += _regression_line(evaluation, go_no_go)
    if detection:
        lines += _detection_lines(detection)
    lines += ["", "### Go/No-Go checks", targets_table(go_no_go)]
    people = _attestation_lines(checks)
    if people:
        lines += ["", "### Attested and ruled-out checks", *people]
    if checks:
        lines += ["", "### Stage checks (checks.json)", checks_table(checks)]
    if picture is not None:
        lines += ["", "## Pictures", *_pictures(evaluation, detection, picture)]
    lines += ["", "## Lessons"]
    lines += [f"- {item}" for item in _lessons(train, evaluation, subset)]
    lines += ["", "## Next actions"]
    lines += [f"- option `{o['id']}`: {o['label']}" for o in advice.get("options", [])]
    lines += [f"- try `{s['key']}={s['value']}` — {s['why']}" for s in advice.get("suggestions", [])[:5]]
    lines += ["", "## Files"] + [f"- {k}: `{v}`" for k, v in paths.items()]
    return "\n".join(lines) + "\n"
