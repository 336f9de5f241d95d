"""ledger.json: the experiment's record of stage decisions (GO/NO-GO, advisor choice, timestamps).

Scheduled progression reads it to decide which stage runs next; it is written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

STAGES = (1, 2, 3, 4)


@dataclass
class StageRecord:
    stage: int
    decision: str  # GO | NO_GO
    reasons: List[str] = field(default_factory=list)
    recommendation: str = ""  # RECOMMEND_PROCEED | SUGGEST_OPTIMIZE | WARN_STOP
    choice: str = ""  # proceed | rerun_optimized | stop
    chosen_by: str = ""  # human | policy
    reviewer: str = ""  # the person's name or note when chosen_by == human
    overridden: List[str] = field(default_factory=list)  # the NO_GO reasons / advisor findings a person overrode
    checks: Dict[str, str] = field(default_factory=dict)  # stage check name -> status (checks.json)
    metrics: Dict = field(default_factory=dict)
    checkpoints: Dict[str, str] = field(default_factory=dict)
    overrides: List[str] = field(default_factory=list)  # the advisor's key=value suggestions, for a re-run
    flow_run_id: str = ""
    finished_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def override(self) -> bool:
        """A person chose to proceed although Go/No-Go or the advisor said otherwise."""
        return self.chosen_by == "human" and self.choice == "proceed" and bool(self.overridden)

    @property
    def approved(self) -> bool:
        """GO and proceed, or a person's proceed over a NO_GO (an unattended policy never overrides a NO_GO)."""
        return self.choice == "proceed" and (self.decision == "GO" or self.chosen_by == "human")


def overridden_findings(go_no_go: Dict, advice: Dict) -> List[str]:
    """What a person's 'proceed' overrides: the NO_GO reason codes and an advisor that did not recommend proceeding."""
    found = list(go_no_go.get("reasons") or [])
    if advice.get("recommendation") not in (None, "RECOMMEND_PROCEED"):
        failed = advice.get("failed_mandatory") or []
        found.append(f"advisor {advice['recommendation']}: {advice.get('message', '')}"
                     + (f" (failed checks: {', '.join(failed)})" if failed else ""))
    return found


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.records: List[StageRecord] = [StageRecord(**r) for r in data.get("stages", [])]
        self.final_test: Optional[Dict] = data.get("final_test")

    @classmethod
    def of(cls, exp_dir: Path) -> "Ledger":
        return cls(Path(exp_dir) / "ledger.json")

    def latest(self, stage: int) -> Optional[StageRecord]:
        runs = [r for r in self.records if r.stage == stage]
        return runs[-1] if runs else None

    def record(self, rec: StageRecord) -> None:
        self.records.append(rec)
        self.save()

    def record_final_test(self, summary: Dict) -> None:
        self.final_test = summary
        self.save()

    def next_stage(self) -> Optional[int]:
        """The first stage not yet approved (see StageRecord.approved); None when Stage 4 is approved."""
        for stage in STAGES:
            rec = self.latest(stage)
            if rec is None or not rec.approved:
                return stage
        return None

    def plan(self, start: int = 1, end: int = 4) -> Dict:
        """What a scheduled "advance" run should do now, read from the ledger alone.

        run      the next stage has no record yet, or its last choice was rerun_optimized (with overrides)
        blocked  the next stage was decided NO-GO or stop: a human must act before anything runs
        final    Stage 4 is approved: run the final test, once
        done     the final test has run, or the next stage lies outside [start, end]
        """
        stage = self.next_stage()
        if stage is None:
            return {"action": "done" if self.final_test else "final", "stage": None}
        if not start <= stage <= end:
            return {"action": "done", "stage": stage, "why": f"next stage {stage} is outside {start}..{end}"}
        rec = self.latest(stage)
        if rec is None:
            return {"action": "run", "stage": stage, "overrides": []}
        if rec.choice == "rerun_optimized":
            return {"action": "run", "stage": stage, "overrides": list(rec.overrides)}
        return {"action": "blocked", "stage": stage,
                "why": f"stage {stage} was {rec.decision} with choice '{rec.choice}' ({', '.join(rec.reasons)})"}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stages": [asdict(r) for r in self.records], "final_test": self.final_test},
                                  indent=1, ensure_ascii=False))
        tmp.replace(self.path)
