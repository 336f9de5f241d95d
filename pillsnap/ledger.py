"""ledger.json: the experiment's record of what was decided, by whom, in what order.

It holds, each entry numbered by one sequence (`seq`, so order never depends on clock resolution):
  stages        one StageRecord per stage run: Go/No-Go, the advisor, the choice REALLY taken and who took it
  attestations  a named person's confirmation of an attested check, given ahead of a stage's decision
                (`pillsnap attest`); it counts for that stage's next decision
  final_tests   every evaluation of the sealed test split, numbered; none is ever replaced
  reopenings    a named person's decision to train Stage 4 again after a final test
Scheduled progression reads it to decide which stage runs next; it is written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from pillsnap.core import layout

STAGES = (1, 2, 3, 4)
FINAL_STAGE = 4
POLICY_NEVER_OVERRIDES = "an unattended policy never approves a stage Go/No-Go refused or whose mandatory checks " \
                         "did not pass"
ANONYMOUS_PROCEED = "a proceed without the reviewer's name approves nothing: who decides must be a named person"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StageRefused(RuntimeError):
    """A stage may not run now (its predecessor is not approved, or the sealed split was evaluated); says why."""


@dataclass
class StageRecord:
    stage: int
    decision: str  # GO | NO_GO
    reasons: List[str] = field(default_factory=list)
    recommendation: str = ""  # RECOMMEND_PROCEED | SUGGEST_OPTIMIZE | WARN_STOP (after the attestations)
    choice: str = ""  # proceed | rerun_optimized | stop: what was decided, never what a policy wished
    chosen_by: str = ""  # human | policy
    reviewer: str = ""  # the person's name when chosen_by == human
    overridden: List[str] = field(default_factory=list)  # the NO_GO reasons / advisor findings a person overrode
    checks: Dict[str, str] = field(default_factory=dict)  # stage check name -> status (checks.json)
    attestations: Dict[str, Dict] = field(default_factory=dict)  # attested check -> {confirmed, reviewer, at, source}
    metrics: Dict = field(default_factory=dict)
    checkpoints: Dict[str, str] = field(default_factory=dict)
    overrides: List[str] = field(default_factory=list)  # the advisor's key=value suggestions, for a re-run
    stop_reason: str = ""  # why the stage stopped (a policy's "proceed" refused, a person's stop, …)
    predecessor: str = ""  # "" (Stage 1 or approved) or who ran it without an approved predecessor, and why
    # What was judged, by content (evaluate.provenance): the resolved config's hash and file, the manifest, subset
    # and validation rows' hashes, each model's sha256 and its pinned copy, the exports and the models the API served
    evidence: Dict = field(default_factory=dict)
    # The gates applied and where they differ from the shipped configs/pillsnap.yaml (config.gates)
    gates: Dict = field(default_factory=dict)
    # What stopped the stage, by name: Go/No-Go rows that did not pass ("name measured (needs op target)") and
    # mandatory checks that did not pass ({name: status}); empty when nothing did
    blocked_by: Dict = field(default_factory=dict)
    rejudged_from: int = 0  # the seq of the record whose stored results this one re-judged (0: judged in its run)
    flow_run_id: str = ""
    seq: int = 0
    finished_at: str = field(default_factory=now)

    @property
    def override(self) -> bool:
        """A person chose to proceed although Go/No-Go or the advisor said otherwise."""
        return self.chosen_by == "human" and self.choice == "proceed" and bool(self.overridden)

    @property
    def gates_loosened(self) -> List[Dict]:
        """The gates this decision applied that ask less than the shipped ones (or otherwise): overrides."""
        return [d for d in self.gates.get("differences") or [] if d.get("direction") != "tighter"]

    @property
    def approved(self) -> bool:
        """GO and proceed, or a named person's proceed over a NO_GO (an unattended policy never overrides a NO_GO; a
        person's choice counts only with their name)."""
        if self.chosen_by == "human" and not self.reviewer.strip():
            return False
        return self.choice == "proceed" and (self.decision == "GO" or self.chosen_by == "human")

    def summary(self) -> Dict:
        """What the final verdict carries of this stage."""
        return {"stage": self.stage, "decision": self.decision, "reasons": self.reasons, "choice": self.choice,
                "chosen_by": self.chosen_by, "reviewer": self.reviewer, "override": self.override,
                "overridden": self.overridden, "attestations": self.attestations, "predecessor": self.predecessor,
                "gates_loosened": self.gates_loosened,
                "models": {m: v.get("sha256") for m, v in (self.evidence.get("models") or {}).items()},
                "config_sha256": (self.evidence.get("config") or {}).get("sha256"),
                "scale": {k: self.metrics.get(k) for k in ("world_size", "throughput_img_s",
                                                           "per_rank_throughput_img_s", "host_memory_peak_mb",
                                                           "gpu_memory_gb")},
                "finished_at": self.finished_at}


def overridden_findings(go_no_go: Dict, advice: Dict) -> List[str]:
    """What a person's 'proceed' overrides: the NO_GO reason codes and an advisor that did not recommend proceeding."""
    found = list(go_no_go.get("reasons") or [])
    if advice.get("recommendation") not in (None, "RECOMMEND_PROCEED"):
        failed = advice.get("failed_mandatory") or []
        found.append(f"advisor {advice['recommendation']}: {advice.get('message', '')}"
                     + (f" (failed checks: {', '.join(failed)})" if failed else ""))
    return found


def decide(stage: int, go_no_go: Dict, advice: Dict, choice: str, chosen_by: str, reviewer: str = "",
           **fields) -> StageRecord:
    """The record of what was really decided. A named person's choice stands (a proceed over findings is an
    override with the findings named; a proceed without a name approves nothing); a policy's 'proceed' stands only
    for a GO whose mandatory checks all passed, otherwise the stage stops and the record says why."""
    findings = overridden_findings(go_no_go, advice)
    blocked = go_no_go["decision"] != "GO" or bool(advice.get("failed_mandatory"))
    stop_reason, reviewer = "", reviewer.strip()
    if choice == "proceed" and chosen_by == "human" and not reviewer:
        choice, stop_reason = "stop", ANONYMOUS_PROCEED
    elif choice == "proceed" and chosen_by != "human" and blocked:
        choice, stop_reason = "stop", f"{POLICY_NEVER_OVERRIDES}: {'; '.join(findings)}"
    elif choice != "proceed":
        stop_reason = "; ".join(findings) or f"{chosen_by} chose {choice}"
    return StageRecord(stage=stage, decision=go_no_go["decision"], reasons=list(go_no_go["reasons"]),
                       recommendation=advice["recommendation"], choice=choice, chosen_by=chosen_by, reviewer=reviewer,
                       overridden=findings if (chosen_by == "human" and choice == "proceed") else [],
                       overrides=list(advice.get("overrides", [])) if choice == "rerun_optimized" else [],
                       stop_reason=stop_reason, blocked_by=blocking(go_no_go, advice, fields.get("checks") or {}),
                       **fields)


BLOCKING_STATUSES = ("fail", "not_measured", "unattested")


def blocking(go_no_go: Dict, advice: Dict, checks: Dict[str, str]) -> Dict:
    """The Go/No-Go rows and the mandatory checks that did not pass, named with what was measured."""
    def row(r: Dict) -> str:
        measured = "not measured" if r.get("measured") is None else r["measured"]
        measured = f"{measured:.4g}" if isinstance(measured, float) else measured
        target = f"{r['target']:.4g}" if isinstance(r.get("target"), float) else r.get("target")
        return f"{r['name']} {measured} (needs {r['comparison']} {target})"

    return {"gate_rows": [row(r) for r in go_no_go.get("rows") or [] if r.get("status") in BLOCKING_STATUSES],
            "mandatory": {name: checks.get(name, "not recorded") for name in advice.get("failed_mandatory") or []}}


def unattested_blockers(decision: str, chosen_by: str, blocked_by: Dict) -> List[str]:
    """The mandatory checks that stopped a stage only because nobody named had attested them: [] when anything
    else stopped it too (a Go/No-Go row, a measured check that failed, a person's stop)."""
    mandatory = (blocked_by or {}).get("mandatory") or {}
    if decision != "GO" or chosen_by == "human" or not mandatory:
        return []
    return sorted(mandatory) if all(status == "unattested" for status in mandatory.values()) else []


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.records: List[StageRecord] = [StageRecord(**r) for r in data.get("stages", [])]
        self.attestations: List[Dict] = list(data.get("attestations", []))
        self.final_tests: List[Dict] = list(data.get("final_tests", []))
        if data.get("final_test") and not self.final_tests:  # a ledger written before final tests were numbered
            self.final_tests = [{"number": 1, "seq": 1, **data["final_test"]}]  # after its (seq 0) records
        self.reopenings: List[Dict] = list(data.get("reopenings", []))

    @classmethod
    def of(cls, exp_dir: Path) -> "Ledger":
        return cls(layout.ledger(exp_dir))

    # ------------------------------------------------------------------ reading
    def _next_seq(self) -> int:
        seqs = [r.seq for r in self.records] + [e.get("seq", 0) for e in
                                                (*self.attestations, *self.final_tests, *self.reopenings)]
        return 1 + max(seqs, default=0)

    @property
    def final_test(self) -> Optional[Dict]:
        """The newest final test, or None."""
        return self.final_tests[-1] if self.final_tests else None

    def latest(self, stage: int) -> Optional[StageRecord]:
        runs = [r for r in self.records if r.stage == stage]
        return runs[-1] if runs else None

    def _reopened_since_final(self) -> Optional[Dict]:
        last_final = self.final_test
        reopen = self.reopenings[-1] if self.reopenings else None
        if reopen and (last_final is None or reopen["seq"] > last_final.get("seq", 0)):
            return reopen
        return None

    def _current(self, stage: int) -> Optional[StageRecord]:
        """The stage's latest record, unless Stage 4 was reopened after it (then it must train again)."""
        rec = self.latest(stage)
        reopen = self._reopened_since_final()
        if stage == FINAL_STAGE and rec is not None and reopen and rec.seq < reopen["seq"]:
            return None
        return rec

    def pending_attestations(self, stage: int) -> Dict[str, Dict]:
        """Confirmations given ahead of this stage's next decision: {check: {confirmed, reviewer, at, source}}."""
        rec = self.latest(stage)
        after = rec.seq if rec else 0
        out: Dict[str, Dict] = {}
        for a in self.attestations:
            if a["stage"] == stage and a["seq"] > after:
                out[a["check"]] = {"confirmed": True, "reviewer": a["reviewer"], "at": a["at"], "source": "ledger",
                                   **({"note": a["note"]} if a.get("note") else {})}
        return out

    def next_stage(self) -> Optional[int]:
        """The first stage not yet approved (see StageRecord.approved); None when Stage 4 is approved."""
        for stage in STAGES:
            rec = self._current(stage)
            if rec is None or not rec.approved:
                return stage
        return None

    def approved_in_order(self, last: int = FINAL_STAGE) -> List[str]:
        """Why Stages 1..last are not all approved one after the other ([] when they are)."""
        problems, previous = [], 0
        for stage in range(1, last + 1):
            rec = self._current(stage)
            if rec is None:
                problems.append(f"Stage {stage} has no decision")
            elif not rec.approved:
                problems.append(f"Stage {stage} is not approved ({rec.decision}, choice {rec.choice!r})")
            elif rec.seq < previous:
                problems.append(f"Stage {stage} was decided before Stage {stage - 1}'s latest run")
            previous = rec.seq if rec else previous
        return problems

    def check_stage_may_run(self, stage: int, without_approved_predecessor: str = "") -> str:
        """Raises StageRefused when the stage may not run; returns the recorded reason for a forced run ('' if not).

        A stage needs its predecessor approved (or a person's stated reason to run without it, which the stage's
        record keeps, so the regression guard is skipped on the record, never silently); Stage 4 may not train
        again after a final test until a person reopens it."""
        if stage == FINAL_STAGE and self.final_tests and not self._reopened_since_final():
            raise StageRefused(
                f"{self.path}: the sealed test split was evaluated {len(self.final_tests)} time(s) (last "
                f"{self.final_test.get('evaluated_at')}); training Stage {stage} again needs an explicit reopen: "
                f"`pillsnap reopen --stage {stage} --reviewer NAME --reason TEXT`")
        previous = self._current(stage - 1) if stage > 1 else None
        if stage == 1 or (previous is not None and previous.approved):
            return ""
        if without_approved_predecessor.strip():
            return f"run without an approved Stage {stage - 1}: {without_approved_predecessor.strip()}"
        state = "has no decision" if previous is None else \
            f"is {previous.decision} with choice {previous.choice!r}"
        raise StageRefused(
            f"{self.path}: Stage {stage - 1} {state}; Stage {stage} runs after an approved Stage {stage - 1} (its "
            f"regression guard compares with it). Run Stage {stage - 1}, or state who runs it anyway and why: "
            f"--without-approved-predecessor 'NAME: REASON' (recorded)")

    def plan(self, start: int = 1, end: int = 4) -> Dict:
        """What a scheduled "advance" run should do now, read from the ledger alone.

        run      the next stage has no record yet, or its last choice was rerun_optimized (with overrides)
        rejudge  the next stage was stopped only by mandatory checks nobody had attested, and named persons have
                 attested every one of them since: its stored results are judged again, nothing is retrained
        blocked  the next stage was decided NO-GO or stop: a human must act before anything runs (`blocked_by`
                 names the rows and checks that stopped it)
        final    Stage 4 is approved: run the final test, once
        done     the final test has run, or the next stage lies outside [start, end]
        """
        stage = self.next_stage()
        if stage is None:  # the final test is due once per approved Stage 4
            tested = self.final_test is not None and self.final_test.get("seq", 0) > self.latest(FINAL_STAGE).seq
            return {"action": "done" if tested else "final", "stage": None}
        if not start <= stage <= end:
            return {"action": "done", "stage": stage, "why": f"next stage {stage} is outside {start}..{end}"}
        rec = self._current(stage)
        if rec is None:
            return {"action": "run", "stage": stage, "overrides": []}
        if rec.choice == "rerun_optimized":
            return {"action": "run", "stage": stage, "overrides": list(rec.overrides)}
        waiting = unattested_blockers(rec.decision, rec.chosen_by, rec.blocked_by)
        if waiting and set(waiting) <= set(self.pending_attestations(stage)):
            return {"action": "rejudge", "stage": stage, "attested": sorted(waiting)}
        return {"action": "blocked", "stage": stage,
                "why": f"stage {stage} was {rec.decision} with choice '{rec.choice}' ({', '.join(rec.reasons)})"
                       + (f": {rec.stop_reason}" if rec.stop_reason else ""),
                "blocked_by": rec.blocked_by, "unattested": waiting,
                "pending": sorted(self.pending_attestations(stage))}

    # ------------------------------------------------------------------ writing
    def record(self, rec: StageRecord) -> StageRecord:
        rec.seq = self._next_seq()
        self.records.append(rec)
        self.save()
        return rec

    def attest(self, stage: int, check: str, reviewer: str, note: str = "") -> Dict:
        if stage not in STAGES:
            raise ValueError(f"stage={stage} is not one of {list(STAGES)}")
        if not reviewer.strip():
            raise ValueError("an attestation needs the name of the person who confirms it (--reviewer)")
        entry = {"seq": self._next_seq(), "stage": stage, "check": check, "reviewer": reviewer.strip(), "at": now(),
                 **({"note": note} if note else {})}
        self.attestations.append(entry)
        self.save()
        return entry

    def record_final_test(self, summary: Dict) -> Dict:
        entry = {"number": len(self.final_tests) + 1, "seq": self._next_seq(), **summary}
        self.final_tests.append(entry)
        self.save()
        return entry

    def reopen(self, stage: int, reviewer: str, reason: str) -> Dict:
        if stage != FINAL_STAGE:
            raise ValueError(f"only Stage {FINAL_STAGE} is sealed by the final test; stage={stage}")
        if not self.final_tests:
            raise ValueError(f"{self.path}: no final test has run; Stage {stage} is not sealed")
        if not (reviewer.strip() and reason.strip()):
            raise ValueError("a reopen needs the person's name (--reviewer) and the reason (--reason)")
        entry = {"seq": self._next_seq(), "stage": stage, "reviewer": reviewer.strip(), "reason": reason.strip(),
                 "at": now(), "after_final_tests": len(self.final_tests)}
        self.reopenings.append(entry)
        self.save()
        return entry

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stages": [asdict(r) for r in self.records], "attestations": self.attestations,
                                   "final_tests": self.final_tests, "reopenings": self.reopenings},
                                  indent=1, ensure_ascii=False))
        tmp.replace(self.path)
