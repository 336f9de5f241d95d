"""What a decision judged, by content: the chain from the data to the served model, checked and recorded.

A stage's steps hand each other files by path; a verdict must describe the files it approves. Before a decision is
recorded, `judged_evidence` checks the chain link by link, each by its hash, against what the steps recorded and
what is on disk now:

    subset rows --trained on--> best.pt --evaluated--> figures          (subset hash, best.pt sha256, val rows hash)
                                best.pt --exported--> ONNX --served--> the API check   (source / export sha256)

A link that does not hold (another run retrained or rebuilt something meanwhile, e.g. during hours of review) stops
the decision with ArtifactChanged naming both hashes: nothing is approved on evidence about other files. The
models judged are then pinned by content (stage_<n>/decided/<model>-<sha>.pt, copies: a hard link would share
best.pt's bytes, and anything that rewrites best.pt in place would rewrite the approved model with it): what the
record names stays on disk, whatever the stage's next run writes to best.pt; the warm start of the next stage and
the final test load these files and check their sha256 first.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from pillsnap.config import PillSnapConfig, config_hash
from pillsnap.core import layout
from pillsnap.core.identity import ArtifactChanged, file_sha256, short, verify_file
from pillsnap.core.jsonio import write_json_atomic

JUDGED = "judged.json"  # reports/: the stored results a decision read (a later re-judgement reads them again)


def chain_problems(subset: Mapping[str, Any], trained: Mapping[str, Mapping[str, Any]],
                   evaluation: Mapping[str, Any], export: Optional[Mapping[str, Any]],
                   api: Optional[Mapping[str, Any]], detection: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Every link of the chain that does not hold, named with both hashes ([] when it all holds). `detection`: the
    detector's results, whose combination evaluation names the models it loaded."""
    problems: List[str] = []

    def same(what: str, found: Optional[str], expected: Optional[str]) -> None:
        if found != expected:
            problems.append(f"{what}: {short(found)} vs {short(expected)}")

    for model, result in trained.items():
        recorded = result.get("best_sha256")
        path = Path(result["best_checkpoint"])
        same(f"the {model}'s {path} on disk now vs as trained", file_sha256(path) if path.is_file() else None,
             recorded)
        same(f"the {model}'s training subset vs this run's subset", (result.get("data_identity") or {}).get("subset"),
             subset.get("subset_hash"))
    classifier = trained.get("classifier") or {}
    same("the evaluated classifier vs the trained one", evaluation.get("checkpoint_sha256"),
         classifier.get("best_sha256"))
    same("the evaluated validation rows vs the subset's", evaluation.get("val_hash"), subset.get("val_hash"))
    combination = (detection or {}).get("combination") or {}
    for model, sha in (combination.get("models") or {}).items():
        same(f"the {model} the combination photos were evaluated with vs the trained one", sha,
             (trained.get(model) or {}).get("best_sha256"))
    for model, result in trained.items():
        exported = (export or {}).get(model) or {}
        if not exported.get("exported"):
            continue  # a failed export fails its own check; there is nothing of it to bind
        same(f"the {model}'s export source vs the trained model", exported.get("source_sha256"),
             result.get("best_sha256"))
        path = Path(exported["path"])
        same(f"{path} on disk now vs as exported", file_sha256(path) if path.is_file() else None,
             exported.get("sha256"))
        served = (((api or {}).get("model") or {}).get("files") or {}).get(model)
        if served is not None:
            same(f"the {model} the API check served vs the export", served.get("sha256"), exported.get("sha256"))
    return problems


def pin_model(exp_dir: Path, stage: int, model: str, checkpoint: Path, sha256: str) -> Path:
    """A copy of the judged checkpoint under its content's name (once per content: a re-judgement reuses it)."""
    pinned = layout.decided_model(exp_dir, stage, model, sha256)
    if not pinned.is_file():
        pinned.parent.mkdir(parents=True, exist_ok=True)
        tmp = pinned.with_name(f".{pinned.name}.{os.getpid()}.tmp")
        shutil.copyfile(checkpoint, tmp)
        tmp.replace(pinned)
    verify_file(pinned, sha256, f"the {model} judged at Stage {stage}")
    return pinned


def judged_evidence(cfg: PillSnapConfig, stage: int, config_file: str, stored: Mapping[str, Any]) -> Dict[str, Any]:
    """The record's evidence (every hash of the chain), after the chain was checked; the judged models pinned and
    `stored` written to reports/judged.json (a later re-judgement reads it again).

    `stored`: what the stage's tasks returned (validation, subset, trained = {model: result}, evaluation, detection,
    export, api, checks) and what the decision read (results, go_no_go)."""
    validation, subset, trained = stored["validation"], stored["subset"], stored["trained"]
    export, api = stored.get("export"), stored.get("api")
    problems = chain_problems(subset, trained, stored["evaluation"], export, api, stored.get("detection"))
    if problems:
        raise ArtifactChanged(f"Stage {stage}: the decision is not recorded, what was judged is not what is on disk "
                              f"(another run of this experiment changed it meanwhile); run the stage again:\n  - "
                              + "\n  - ".join(problems))
    models = {m: {"checkpoint": str(pin_model(cfg.exp_dir, stage, m, Path(r["best_checkpoint"]), r["best_sha256"])),
                  "sha256": r["best_sha256"], "trained_as": r["best_checkpoint"]} for m, r in trained.items()}
    stored_file = write_json_atomic(layout.reports_dir(cfg.exp_dir, stage) / JUDGED, dict(stored))
    return {
        "config": {"sha256": config_hash(cfg), "file": config_file},
        "data": {"manifest": validation.get("manifest_hash"), "subset": subset.get("subset_hash"),
                 "val": subset.get("val_hash")},
        "models": models,
        "exports": {m: e.get("sha256") for m, e in (export or {}).items()
                    if isinstance(e, dict) and e.get("exported")},
        "served": {m: f.get("sha256") for m, f in (((api or {}).get("model") or {}).get("files") or {}).items()},
        "training": {"world_size": max((r.get("world_size") or 1) for r in trained.values()),
                     "fingerprint": {m: r.get("fingerprint") for m, r in trained.items()},
                     "warm_start": dict((trained.get("classifier") or {}).get("data_identity", {}).get("warm_start")
                                        or {})},
        "judged": {"file": str(stored_file), "sha256": file_sha256(stored_file)},
    }


def judged_model(record_models: Mapping[str, Mapping[str, Any]], model: str, what: str) -> Optional[Path]:
    """The pinned file of a model a decision judged, checked against its recorded sha256 (ArtifactChanged names
    both); None when the decision judged no such model."""
    entry = record_models.get(model)
    if not entry:
        return None
    verify_file(entry["checkpoint"], entry.get("sha256"), what)
    return Path(entry["checkpoint"])


def stored_judgement(exp_dir: Path, stage: int) -> Dict[str, Any]:
    """The latest decision of a stage as it can be judged again: {record, config (the one it was judged by), judged
    (its stored results)}, each checked against the hashes the record holds, and the models it judged still there.
    ArtifactChanged names what does not match; a record from before decisions were stored cannot be re-judged."""
    from pillsnap.config import load_config
    from pillsnap.core.jsonio import read_json
    from pillsnap.ledger import Ledger

    rec = Ledger.of(exp_dir).latest(stage)
    evidence = rec.evidence if rec is not None else {}
    if not evidence.get("judged"):
        raise ArtifactChanged(f"Stage {stage}'s latest decision stored no results to judge again (none, or a ledger "
                              f"from before decisions were bound to content): run `pillsnap stage --stage {stage}`")
    verify_file(evidence["judged"]["file"], evidence["judged"]["sha256"], f"Stage {stage}'s stored results")
    cfg = load_config(evidence["config"]["file"])
    if config_hash(cfg) != evidence["config"]["sha256"]:
        raise ArtifactChanged(f"{evidence['config']['file']}: not the config Stage {stage} was judged by (hash "
                              f"{config_hash(cfg)}, recorded {evidence['config']['sha256']})")
    for model in evidence.get("models") or {}:
        judged_model(evidence["models"], model, f"the {model} Stage {stage} judged")
    return {"record": rec, "config": cfg, "judged": read_json(evidence["judged"]["file"])}
