"""The loop that drives training units. `sequential` (the classifier alone) and `interleaved` (D-1: d detector
steps, then c classifier steps) are two schedules of the SAME loop, so both get everything:

    for tick in ...:                     # one tick = one optimizer step of one unit
        member = the unit whose turn it is (a unit that finished its epochs or stopped early is skipped)
        window = member.stream.next_window(accumulation)
        loss = member.guard.step(window)    # OOM recovery, compile fallback, non-finite guard (oom_guard.py)
        log line + TensorBoard, health monitors, recovery.pt every train.recovery_every_steps ticks
        at the end of the member's epoch: validate, best.pt (one "improved?" rule), early stopping,
        last.pt (every unit's state + the loop's), reports/metrics.json

Each unit keeps its own epochs (train.<model>.epochs), schedule, OOM state and early stopping. Checkpoints:
<stage>/checkpoints/{last,recovery,emergency}.pt hold the whole run (the classifier's schema at the top, every
unit's training state under "units"), so a resume continues at the same tick and sample; each model's best.pt is
in its own schema and folder.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.core.checkpoints import check_compatible
from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.data.datasets import SkipCounter
from pillsnap.progress import progress
from pillsnap.train.data import UnitData
from pillsnap.train.loops.streams import Stream, steps_per_epoch
from pillsnap.train.results import TrainResult, epoch_rows
from pillsnap.train.services.checkpointer import (Checkpointer, improved, restore_rng_state, rng_state,
                                                  training_fingerprint)
from pillsnap.train.services.health import TrainingHealth
from pillsnap.train.services.oom import FaultInjector, OomPolicy, OomState
from pillsnap.train.services.oom_guard import OomGuard
from pillsnap.train.services.schedule import scale_optimizer_hparams
from pillsnap.train.services.telemetry import TBWriter, Telemetry
from pillsnap.train.units.base import TrainUnit

log = logging.getLogger(__name__)
StepHook = Callable[[int, float, str], None]  # (tick, loss, model) after every optimizer step
EpochHook = Callable[[str, int, Dict[str, Any]], None]  # (model, epoch, record) after every validated epoch


class SimulatedCrash(RuntimeError):
    """Raised once at train.crash_at_step to test retries and resume; never raised in a normal run."""


@dataclass
class Track:
    """What the loop counts for one unit; checkpointed so a resume continues exactly."""
    epoch: int = 0
    steps_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    item_sums: Dict[str, float] = field(default_factory=dict)
    done: bool = False
    stopped_early: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)


class Member:
    """One unit inside a loop, with its data stream, telemetry, OOM guard, health monitors and files."""

    def __init__(self, cfg: PillSnapConfig, unit: TrainUnit, data: UnitData, out_dir: Path, section: str,
                 injector: FaultInjector, ratio: int = 1):
        self.unit, self.data, self.out, self.section, self.ratio = unit, data, Path(out_dir), section, ratio
        self.stream = Stream(data, unit.batch_size, len(data.dataset))
        self.track = Track()
        self.tb = TBWriter(self.out / "tb", cfg.logging.tensorboard)
        self.telemetry = Telemetry(self.tb, unit.log_tag, unit.epochs, cfg.train.step_log_interval,
                                   unit.policy.device)
        self.health = TrainingHealth(cfg, self.tb, unit.monitor, unit.mode)
        self.guard = OomGuard(unit, OomPolicy.from_config(cfg.train.oom), injector, lambda: Path(), self.telemetry)
        self.plans: Dict[str, Optional[Dict[str, Any]]] = {"batch": None, "workers": None}
        self.facts: Dict[str, Any] = {}  # what the unit trained on, for the result

    @property
    def best_path(self) -> Path:
        return self.out / "checkpoints" / "best.pt"

    @property
    def steps_now(self) -> int:
        return max(1, math.ceil(self.stream.samples_per_epoch / self.unit.global_batch))

    def meta(self) -> Dict[str, Any]:
        return {"track": asdict(self.track), "stream": {**self.stream.state(),
                                                         "samples_per_epoch": self.stream.samples_per_epoch},
                "oom_state": asdict(self.guard.recovery.state), "oom_events": self.guard.events,
                "health": self.health.state_dict(), "plans": self.plans}

    def restore_meta(self, meta: Dict[str, Any]) -> None:
        self.track = Track(**meta["track"])
        self.stream.restore(meta["stream"])
        self.stream.samples_per_epoch = int(meta["stream"]["samples_per_epoch"])
        self.guard.recovery.state = OomState(**meta["oom_state"])
        self.guard.events = list(meta["oom_events"])
        self.health.load_state_dict(meta["health"])
        self.plans = meta["plans"]


class UnitLoop:
    def __init__(self, cfg: PillSnapConfig, members: Sequence[Member], ckpt_dir: Path, reports_dir: Path,
                 strategy: str, step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                 show_progress: bool = True):
        self.cfg, self.members, self.strategy = cfg, list(members), strategy
        self.primary = next(m for m in self.members if m.unit.name == "classifier")
        self.reports = Path(reports_dir) / "metrics.json"
        self.step_hook, self.epoch_hook, self.show_progress = step_hook, epoch_hook, show_progress
        self.config = to_dict(cfg)
        self.ckpt = Checkpointer(ckpt_dir, json.dumps(self.config), "")
        self.tick = 0
        for m in self.members:
            m.guard.emergency = lambda: self._save("emergency.pt")

    # ------------------------------------------------------------------ set-up
    def apply_plans(self, plans: Dict[str, Dict[str, Optional[Dict[str, Any]]]]) -> None:
        """Batch / worker plans per model (auto batch, worker autotune), before the first step of a fresh run."""
        for m in self.members:
            batch, workers = (plans.get(m.unit.name) or {}).get("batch"), (plans.get(m.unit.name) or {}).get("workers")
            if batch is not None:
                apply_batch_plan(m, batch)
            if workers is not None:
                m.stream.set_workers(int(workers["num_workers"]))
                m.plans["workers"] = dict(workers)
                m.telemetry.scalars({"perf/num_workers": m.stream.num_workers}, 0)
                log.info("%s dataloader: %d workers (%s)", m.unit.name, m.stream.num_workers,
                         workers.get("reason", "plan given"))

    def _plan(self, m: Member) -> None:
        u, tc = m.unit, self.cfg.train
        n = len(m.data.dataset)
        spe = steps_per_epoch(n, u.batch_size, u.accum, m.data.drop_last, tc.max_steps_per_epoch)
        m.stream.samples_per_epoch = max(1, min(n, spe * u.global_batch))
        u.plan_schedule(spe * u.epochs)

    def _resume(self) -> Optional[int]:
        if self.cfg.train.resume != "last":
            return None
        def recorded_bests(payload: Dict[str, Any]) -> List[Path]:
            return [m.best_path for m in self.members
                    if json.loads(payload["units"][m.unit.name]["meta_json"])["track"]["best_epoch"] > 0]

        found = self.ckpt.resumable(recorded_bests, [m.best_path.parent for m in self.members])
        if found is None:
            log.info("train.resume=last: nothing to resume in %s, starting fresh", self.ckpt.dir)
            return None
        path, payload = found
        p = self.primary.unit
        check_compatible(payload, p.cfg.classification.backbone, len(p.labels), p.labels.hash, path)
        for m in self.members:
            state = payload["units"][m.unit.name]
            m.unit.load_state_dict(state, payload["model"] if m is self.primary else None)
            m.restore_meta(json.loads(state["meta_json"]))
        self.tick = int(payload["global_step"])
        restore_rng_state(payload["rng"])
        log.info("%s: resumed at tick %d (%s)", self.strategy, self.tick,
                 ", ".join(f"{m.unit.name} epoch {m.track.epoch + 1} sample {m.stream.pos}" for m in self.members))
        return self.tick

    # ------------------------------------------------------------------ the loop
    def run(self) -> Dict[str, TrainResult]:
        for m in self.members:
            self._plan(m)
        self.ckpt.fingerprint = training_fingerprint(self.config, {m.unit.name: m.plans["batch"]
                                                                   for m in self.members})
        resumed = self._resume()
        for m in self.members:
            self._log_settings(m)
        try:
            self._train()
        finally:
            for m in self.members:
                m.tb.close()
                m.health.close()
                m.stream.close()
        return {m.unit.name: self._result(m, resumed) for m in self.members}

    def _train(self) -> None:
        total = sum(m.stream.samples_per_epoch * m.unit.epochs for m in self.members)
        done = sum(m.track.epoch * m.stream.samples_per_epoch + m.stream.pos for m in self.members)
        with progress(total=total, desc=f"train {'+'.join(m.unit.name for m in self.members)}", unit="img",
                      enabled=self.show_progress) as bar:
            bar.update(done)
            for m in self.members:
                if not m.track.done:
                    m.health.on_epoch_start(m.track.epoch + 1, m.unit.updates, m.unit.batch_size)
            while not all(m.track.done for m in self.members):
                m = self._next_member()
                bar.update(self._step(m))
                if m.stream.epoch_done:
                    self._end_epoch(m)  # writes last.pt: the last epoch end leaves the finished run's state

    def _next_member(self) -> Member:
        cycle = sum(m.ratio for m in self.members)
        slot, upto = self.tick % cycle, 0
        for i, m in enumerate(self.members):
            upto += m.ratio
            if slot < upto:
                break
        order = self.members[i:] + self.members[:i]
        return next(m for m in order if not m.track.done)

    def _step(self, m: Member) -> int:
        t0 = time.perf_counter()
        window, consumed = m.stream.next_window(m.unit.accum)
        t1 = time.perf_counter()
        if not window:  # nothing readable in these positions (or the epoch ran dry): nothing to step on
            return consumed
        loss = m.guard.step(window, m.unit.updates + 1, m.track.epoch + 1)
        if loss is None:  # OOM S3: the window's samples are re-fed at the new global batch
            m.stream.rewind(consumed)
            m.stream.set_batch_size(m.unit.batch_size)
            log.warning("%s continues at batch %d x accum %d (global batch %d); the failed window's samples are "
                        "replayed", m.unit.name, m.unit.batch_size, m.unit.accum, m.unit.global_batch)
            return 0
        self.tick += 1
        self._after_step(m, loss, sum(m.unit.batch_len(b) for b in window), t1 - t0, time.perf_counter() - t1)
        return consumed

    def _after_step(self, m: Member, loss: float, samples: int, data_time: float, compute_time: float) -> None:
        t, tc = m.track, self.cfg.train
        t.steps_in_epoch += 1
        t.loss_sum, t.loss_count = t.loss_sum + loss, t.loss_count + 1
        for key, value in getattr(m.unit, "last_items", {}).items():
            t.item_sums[key] = t.item_sums.get(key, 0.0) + value
        m.telemetry.step(m.unit.updates, t.epoch + 1, t.steps_in_epoch, m.steps_now, loss, m.unit.lr, samples,
                         data_time, compute_time)
        m.health.on_step(m.unit.updates, loss)
        if tc.recovery_every_steps and self.tick % tc.recovery_every_steps == 0:
            self._save("recovery.pt")
        if self.step_hook is not None:
            self.step_hook(self.tick, loss, m.unit.name)
        self._maybe_simulate_crash()

    def _maybe_simulate_crash(self) -> None:
        at = self.cfg.train.crash_at_step
        if at is None or self.tick != at:
            return
        marker = self.ckpt.dir / f".simulated_crash_{at}"  # fail once: the retry must get past this step
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise SimulatedCrash(f"train.crash_at_step={at}: simulated crash after global step {at}")

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self, m: Member) -> None:
        u, t, es = m.unit, m.track, self.cfg.train.early_stopping
        metrics = u.validate()
        value = metrics.get(u.monitor)
        record = {"epoch": t.epoch + 1, "global_step": u.updates, "train_loss": t.loss_sum / max(1, t.loss_count),
                  "train": {k: v / max(1, t.loss_count) for k, v in t.item_sums.items()}, "val": metrics,
                  "lr": u.lr, "batch_size": u.batch_size, "grad_accum": u.accum,
                  "resources": m.telemetry.end_epoch()}
        t.history.append(record)
        m.telemetry.validation({k: metrics.get(k) for k in VAL_LOG_KEYS.get(u.name, ())}, u.updates)
        m.telemetry.scalars({f"train/{k}": v for k, v in record["train"].items()}, u.updates)
        shown = " ".join(f"{k}={_fmt(metrics.get(k))}" for k in VAL_LOG_KEYS.get(u.name, ()))
        log.info("%s val e=%d %s n=%s", u.log_tag, t.epoch + 1, shown, metrics.get("n", metrics.get("n_images")))
        if improved(value, t.best_metric, u.mode, es.min_delta):
            t.best_metric, t.best_epoch, t.bad_epochs = float(value), t.epoch + 1, 0
            self._save_weights(m, "best.pt", record)
        else:
            t.bad_epochs += 1
        m.health.on_epoch_end(t.epoch + 1, value)
        t.epoch += 1
        t.steps_in_epoch, t.loss_sum, t.loss_count, t.item_sums = 0, 0.0, 0, {}
        if es.enabled and t.bad_epochs >= es.patience:
            t.stopped_early = t.done = True
            log.info("%s early stopping: %s did not improve by %s for %d epochs (best %s at epoch %d)", u.name,
                     u.monitor, es.min_delta, es.patience, _fmt(t.best_metric), t.best_epoch)
        if t.epoch >= u.epochs:
            t.done = True
        if not t.done:
            m.stream.new_epoch()
            m.health.on_epoch_start(t.epoch + 1, u.updates, u.batch_size)
        if m is not self.primary:
            self._save_weights(m, "last.pt", record)
        self._save("last.pt")
        self._write_metrics(m)
        m.tb.flush()
        if self.epoch_hook is not None:
            self.epoch_hook(u.name, t.epoch, record)

    # ------------------------------------------------------------------ files
    def _payload(self) -> Dict[str, Any]:
        p = self.primary
        units = {}
        for m in self.members:
            state = m.unit.state_dict(with_model=m is not p)
            state["meta_json"] = json.dumps(m.meta())
            units[m.unit.name] = state
        return {"model": p.unit.model.state_dict(), **p.unit.identity(), "units": units, "strategy": self.strategy,
                "global_step": self.tick, "epoch": p.track.epoch, "best_metric": p.track.best_metric,
                "oom_state": asdict(p.guard.recovery.state), "rng": rng_state()}

    def _save(self, name: str) -> Path:
        return self.ckpt.save(name, self._payload())

    def _save_weights(self, m: Member, name: str, record: Dict[str, Any]) -> Path:
        payload = {**m.unit.weights_payload(), "epoch": record["epoch"], "global_step": m.unit.updates,
                   "best_metric": m.track.best_metric, "monitor": m.unit.monitor, "strategy": self.strategy,
                   "val_metrics_json": json.dumps(record["val"], default=str)}
        return self.ckpt.save(name, payload, directory=m.best_path.parent)

    def _write_metrics(self, m: Member) -> None:
        doc = read_json(self.reports) if self.reports.is_file() else {}
        doc[m.section] = {"latest": m.track.history[-1], "history": m.track.history}
        write_json_atomic(self.reports, doc)

    def _log_settings(self, m: Member) -> None:
        u, st = m.unit, m.guard.recovery.state
        log.info("%s run: batch %d x accum %d = global %d, eval batch %d, %d workers, micro-batch %d, %s, compile "
                 "%s, %d train samples, %d epochs of %d samples", u.name, u.batch_size, u.accum, u.global_batch,
                 u.eval_batch_size, m.stream.num_workers, st.batch_size, u.policy.describe(), u.train_model.state,
                 len(m.data.dataset), u.epochs, m.stream.samples_per_epoch)

    def _result(self, m: Member, resumed: Optional[int]) -> TrainResult:
        u, t = m.unit, m.track
        best = next((h for h in t.history if h["epoch"] == t.best_epoch), None)
        val = dict(best["val"]) if best else {}
        return TrainResult(
            model=u.name, strategy=self.strategy, backbone=u.identity()["backbone"],
            best_checkpoint=str(m.best_path),
            last_checkpoint=str((self.ckpt.dir if m is self.primary else m.best_path.parent) / "last.pt"),
            monitor=u.monitor, best_metric=t.best_metric, best_epoch=t.best_epoch, epochs_completed=t.epoch,
            epochs_planned=u.epochs, global_step=u.updates, resumed_from_step=resumed, stopped_early=t.stopped_early,
            val_metrics=val, history=t.history, epochs=epoch_rows(t.history, u.monitor),
            mean_throughput=m.telemetry.mean_throughput,
            skipped_samples=SkipCounter.skipped if u.name == "classifier" else 0,
            class_map_hash=u.identity()["class_map_hash"], policy=u.policy.describe(),
            batch_size=u.batch_size, grad_accum=u.accum, oom_events=list(m.guard.events),
            auto_batch=m.plans["batch"], num_workers=m.plans["workers"], warnings=m.health.summary(),
            tensorboard=str(m.out / "tb"), compile=u.train_model.state,
            not_measured=[] if t.best_metric is not None else [u.monitor], data=dict(m.facts))


VAL_LOG_KEYS = {"classifier": ("val_loss", "accuracy", "macro_f1", "top5"),
                "detector": ("mAP_0.5", "mAP_0.5_0.95", "precision", "recall")}


def apply_batch_plan(m: Member, plan: Dict[str, Any]) -> None:
    """Train at the plan's batch / accumulation / eval batch; LR by the linear scaling rule vs the configured G."""
    u = m.unit
    u.batch_size, u.accum = int(plan["batch_size"]), int(plan["grad_accum"])
    u.eval_batch_size = int(plan.get("eval_batch_size") or u.batch_size)
    lr_scale = u.global_batch / u.configured_global_batch
    if lr_scale != 1.0:
        scale_optimizer_hparams(u.optimizer, None, lr_scale=lr_scale)
    if plan.get("amp_dtype") == "fp16" and u.amp != "fp16":
        u.escalate_precision()
        m.guard.recovery.state.did_amp_escalate = True
    m.stream.set_batch_size(u.batch_size)
    m.guard.reset_state()
    m.plans["batch"] = {**plan, "applied_lr_scale": lr_scale}
    m.telemetry.scalars({"perf/auto_batch_found": u.batch_size, "perf/auto_batch_grad_accum": u.accum,
                         "perf/auto_batch_eval": u.eval_batch_size,
                         "perf/auto_batch_memory_fraction": plan.get("memory_fraction")}, 0)
    source = "probed on " + str(plan.get("device")) if plan.get("probed") else "not probed"
    log.info("%s auto batch: batch %d x accum %d (global %d, configured %d, lr x%.4f), eval batch %d (%s)", u.name,
             u.batch_size, u.accum, u.global_batch, u.configured_global_batch, lr_scale, u.eval_batch_size, source)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"
