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
    metrics: Dict = field(default_factory=dict)
    checkpoints: Dict[str, str] = field(default_factory=dict)
    flow_run_id: str = ""
    finished_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def approved(self) -> bool:
        return self.decision == "GO" and self.choice == "proceed"


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
        """The first stage not yet approved (GO + proceed); None when Stage 4 is approved."""
        for stage in STAGES:
            rec = self.latest(stage)
            if rec is None or not rec.approved:
                return stage
        return None

    def blocked_by(self) -> Optional[StageRecord]:
        """The latest record that stops progression (a NO-GO, or a 'stop'/'rerun' choice), if any."""
        stage = self.next_stage()
        return self.latest(stage) if stage is not None else None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stages": [asdict(r) for r in self.records], "final_test": self.final_test},
                                  indent=1, ensure_ascii=False))
        tmp.replace(self.path)
