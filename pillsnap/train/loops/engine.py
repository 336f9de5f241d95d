"""THE training loop. Both strategies are two schedules of it, so both get everything:

    sequential   the detector's epochs, then the classifier's (one member at a time, in the plan's order)
    interleaved  D-1: d detector steps, then c classifier steps (train.interleave_ratio), until both are done

    for tick in ...:                     # one tick = one optimizer step of one member
        member = the member whose turn it is (one that finished its epochs or stopped early is skipped)
        window = member.stream.next_window(...)      # the samples of one global batch
        loss = member.guard.step(window, ...)        # OOM recovery, compile fallback, non-finite guard (guarded_step.py)
        D-10 line + Annex 7 tags, health monitors; recovery.pt when the checkpoint policy says so
        at the end of the member's epoch: validate, best.pt / last.pt (checkpoint_policy.py), early stopping,
        reports/metrics.json

Each member keeps its own epochs, schedule, OOM state and early stopping; the LR schedule, the stopping rule, the
OOM handling and the checkpoint policy are the same objects for both models in both strategies. Checkpoints:
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
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.core import layout
from pillsnap.core.checkpoints import CheckpointMismatchError, check_compatible
from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.data.datasets import SkipCounter
from pillsnap.progress import progress
from pillsnap.train.data import UnitData
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.loops.streams import Stream, steps_per_epoch
from pillsnap.train.results import TrainResult, epoch_rows, mean_throughput
from pillsnap.train.services.checkpoint_policy import (CheckpointPolicy, restore_rng_state, rng_state,
                                                       training_fingerprint)
from pillsnap.train.services.early_stopping import EarlyStopping
from pillsnap.train.services.health import TrainingHealth
from pillsnap.train.services.oom_state_machine import FaultInjector
from pillsnap.train.services.guarded_step import StepGuard
from pillsnap.train.services.schedule import scale_optimizer_hparams
from pillsnap.train.services.telemetry import TBWriter, Telemetry, over_ranks
from pillsnap.train.units.base import TrainUnit

log = logging.getLogger(__name__)
StepHook = Callable[[int, float, str], None]  # (tick, loss, model) after every optimizer step
EpochHook = Callable[[str, int, Dict[str, Any]], None]  # (model, epoch, record) after every validated epoch
Plans = Mapping[str, Mapping[str, Optional[Mapping[str, Any]]]]  # model -> {"batch": plan, "workers": plan}
SEQUENTIAL, INTERLEAVED = "sequential", "interleaved"


class SimulatedCrash(RuntimeError):
    """Raised once at train.crash_at_step to test retries and resume; never raised in a normal run."""


@dataclass
class Track:
    """What the loop counts for one member's current epoch and its history; checkpointed."""
    epoch: int = 0
    steps_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    item_sums: Dict[str, float] = field(default_factory=dict)
    done: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)


class Member:
    """One unit inside the loop, with its data stream, telemetry, step guard, health monitors and early stopping."""

    def __init__(self, cfg: PillSnapConfig, unit: TrainUnit, data: UnitData, stage_folder: Path, section: str,
                 injector: FaultInjector, ratio: int = 1, facts: Optional[Dict[str, Any]] = None,
                 comm: Optional[Collectives] = None):
        self.unit, self.data, self.section, self.ratio = unit, data, section, ratio
        comm = comm or Collectives()
        self.checkpoints_dir = layout.checkpoints_dir(stage_folder, unit.name)
        self.tensorboard = layout.tensorboard_dir(stage_folder, unit.name)
        self.facts = dict(facts or {})  # what the unit trains on, for the result
        self.stream = Stream(data, unit.batch_size, len(data.dataset), comm.rank, comm.world_size)
        self.track = Track()
        self.stopping = EarlyStopping.from_config(cfg.train.early_stopping, unit.monitor, unit.mode)
        self.tb = TBWriter(self.tensorboard, cfg.logging.tensorboard and comm.is_main)
        self.telemetry = Telemetry(self.tb, unit.log_tag, unit.epochs, cfg.train.step_log_interval,
                                   unit.policy.device)
        self.health = TrainingHealth(cfg, self.tb, unit.monitor, unit.mode)
        self.guard = StepGuard(unit, injector, self.telemetry, comm)
        self.plans: Dict[str, Optional[Dict[str, Any]]] = {"batch": None, "workers": None}

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def best_path(self) -> Path:
        return self.checkpoints_dir / layout.BEST

    @property
    def steps_now(self) -> int:
        return max(1, math.ceil(self.stream.samples_per_epoch / self.unit.global_batch))

    def apply_plans(self, plans: Mapping[str, Optional[Mapping[str, Any]]]) -> None:
        """Batch / worker plans (auto batch, worker autotune), before the first step of a fresh run; then the LR
        by the linear scaling rule for the global batch the run has (a plan's batch, several ranks) against the
        configured one (a resume loads the LR it had reached)."""
        if plans.get("batch") is not None:
            self._apply_batch_plan(dict(plans["batch"]))
        u = self.unit
        lr_scale = u.global_batch / u.configured_global_batch
        if lr_scale != 1.0:
            scale_optimizer_hparams(u.optimizer, None, lr_scale=lr_scale)
        if self.plans["batch"] is not None:
            self.plans["batch"]["applied_lr_scale"] = lr_scale
        workers = plans.get("workers")
        if workers is not None:
            self.stream.set_workers(int(workers["num_workers"]))
            self.plans["workers"] = dict(workers)
            self.telemetry.scalars({"perf/num_workers": self.stream.num_workers}, 0)
            log.info("%s dataloader: %d workers (%s)", self.name, self.stream.num_workers,
                     workers.get("reason", "plan given"))

    def _apply_batch_plan(self, plan: Dict[str, Any]) -> None:
        """Train at the plan's batch / accumulation / eval batch; LR by the linear scaling rule vs the configured G."""
        u = self.unit
        u.set_batch(int(plan["batch_size"]), int(plan["grad_accum"]))
        u.eval_batch_size = int(plan.get("eval_batch_size") or u.batch_size)
        if plan.get("amp_dtype") == "fp16" and u.amp != "fp16":  # the tuner needed fp16 to fit: as after S1
            u.oom.state.amp_dtype, u.oom.state.did_amp_escalate = "fp16", True
            u.escalate_precision()
        self.stream.set_batch_size(u.batch_size)
        self.plans["batch"] = dict(plan)
        self.telemetry.scalars({"perf/auto_batch_found": u.batch_size, "perf/auto_batch_grad_accum": u.accum,
                                "perf/auto_batch_eval": u.eval_batch_size,
                                "perf/auto_batch_memory_fraction": plan.get("memory_fraction")}, 0)
        source = "probed on " + str(plan.get("device")) if plan.get("probed") else "not probed"
        log.info("%s auto batch: batch %d x accum %d (global %d, configured %d), eval batch %d (%s)", u.name,
                 u.batch_size, u.accum, u.global_batch, u.configured_global_batch, u.eval_batch_size, source)

    def meta(self) -> Dict[str, Any]:
        return {"track": asdict(self.track), "stopping": self.stopping.state_dict(),
                "stream": {**self.stream.state(), "samples_per_epoch": self.stream.samples_per_epoch},
                "oom_events": self.guard.events, "health": self.health.state_dict(), "plans": self.plans}

    def restore_meta(self, meta: Dict[str, Any]) -> None:
        self.track = Track(**meta["track"])
        self.stopping.load_state_dict(meta["stopping"])
        self.stream.restore(meta["stream"])
        self.stream.samples_per_epoch = int(meta["stream"]["samples_per_epoch"])
        self.guard.events = list(meta["oom_events"])
        self.health.load_state_dict(meta["health"])
        self.plans = meta["plans"]

    def close(self) -> None:
        self.tb.close()
        self.health.close()
        self.stream.close()


class UnitLoop:
    def __init__(self, cfg: PillSnapConfig, members: Sequence[Member], stage_folder: Path, strategy: str,
                 plans: Optional[Plans] = None, step_hook: Optional[StepHook] = None,
                 epoch_hook: Optional[EpochHook] = None, show_progress: bool = True,
                 comm: Optional[Collectives] = None, data_identity: Optional[Mapping[str, Any]] = None):
        """`data_identity`: what the run trains on and starts from (run.data_identity), in its fingerprint."""
        if strategy not in (SEQUENTIAL, INTERLEAVED):
            raise ValueError(f"train.strategy={strategy!r} is not one of {SEQUENTIAL}, {INTERLEAVED}")
        self.cfg, self.members, self.strategy = cfg, list(members), strategy
        self.comm = comm or Collectives()
        self.primary = next(m for m in self.members if m.name == "classifier")
        self.reports = layout.stage_reports_dir(stage_folder) / "metrics.json"
        self.step_hook, self.epoch_hook, self.show_progress = step_hook, epoch_hook, show_progress
        unknown = set(plans or {}) - {m.name for m in self.members}
        if unknown:
            raise ValueError(f"plans for {sorted(unknown)}: plans are keyed by the models this run trains "
                             f"{[m.name for m in self.members]}: {{model: {{'batch': …, 'workers': …}}}}")
        plans = self.comm.smallest_batch_plans({m.name: dict((plans or {}).get(m.name) or {}) for m in self.members})
        for m in self.members:
            m.apply_plans(plans[m.name])
            self._plan_epochs(m)
        config = to_dict(cfg)
        self.data_identity = dict(data_identity or {})
        fingerprint = training_fingerprint(config, {m.name: m.plans["batch"] for m in self.members},
                                           self.data_identity)
        self.checkpoints = CheckpointPolicy(layout.checkpoints_dir(stage_folder), json.dumps(config), fingerprint,
                                            cfg.train.recovery_every_steps, writes=self.comm.is_main)
        self.tick = 0

    def _plan_epochs(self, m: Member) -> None:
        """Steps and samples per epoch. With several ranks only whole global windows: every rank steps alike."""
        u, tc, world = m.unit, self.cfg.train, self.comm.world_size
        n = len(m.data.dataset)
        if world > 1 and n < u.global_batch:
            raise ValueError(f"{u.config_key}: {n} training samples are fewer than one global batch of "
                             f"{u.global_batch} ({world} ranks x batch {u.batch_size} x accumulation {u.accum})")
        spe = steps_per_epoch(n, u.batch_size * world, u.accum, m.data.drop_last or world > 1,
                              tc.max_steps_per_epoch)
        m.stream.samples_per_epoch = max(1, min(n, spe * u.global_batch))
        u.plan_schedule(spe * u.epochs)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> Optional[int]:
        if self.cfg.train.resume != "last":
            return None

        def recorded_bests(payload: Dict[str, Any]) -> Dict[str, Path]:
            best = payload["checkpoint_policy"]["best"]
            return {m.name: m.best_path for m in self.members if m.name in best}

        found = self.checkpoints.resumable(recorded_bests, [m.checkpoints_dir for m in self.members])
        if found is None:
            log.info("train.resume=last: nothing to resume in %s, starting fresh", self.checkpoints.dir)
            return None
        path, payload = found
        p = self.primary.unit
        check_compatible(payload, p.cfg.classification.backbone, len(p.labels), p.labels.hash, path)
        rngs = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]  # one process wrote a dict
        if len(rngs) != self.comm.world_size:  # nproc_per_node=auto on a machine with other GPUs
            raise CheckpointMismatchError(
                f"{path} was written by {len(rngs)} training process(es), this run has {self.comm.world_size} "
                f"(train.distributed.nproc_per_node={self.cfg.train.distributed.nproc_per_node}): the global batch "
                "and each rank's generators would differ; run with as many processes, or train.resume=none")
        for m in self.members:
            state = payload["units"][m.name]
            m.unit.load_state_dict(state, payload["model"] if m is self.primary else None)
            m.restore_meta(json.loads(state["meta_json"]))
        self.checkpoints.load_state_dict(payload["checkpoint_policy"])
        self.tick = int(payload["global_step"])
        restore_rng_state(rngs[self.comm.rank])  # each rank its own generators
        log.info("%s: resumed at tick %d (%s)", self.strategy, self.tick,
                 ", ".join(f"{m.name} epoch {m.track.epoch + 1} sample {m.stream.pos}" for m in self.members))
        return self.tick

    # ------------------------------------------------------------------ the loop
    def run(self) -> Dict[str, TrainResult]:
        resumed = self._resume()
        for m in self.members:
            for module in (m.unit.model, *([m.unit.ema.module] if m.unit.ema is not None else [])):
                self.comm.broadcast_module(module)  # every rank starts from rank 0's weights
            self._log_settings(m)
        try:
            self._train()
        finally:
            for m in self.members:
                m.close()
        return {m.name: self._result(m, resumed) for m in self.members}

    def _train(self) -> None:
        total = sum(m.stream.samples_per_epoch * m.unit.epochs for m in self.members)
        done = sum(m.track.epoch * m.stream.samples_per_epoch + m.stream.pos for m in self.members)
        with progress(total=total, desc=f"train {'+'.join(m.name for m in self.members)}", unit="img",
                      enabled=self.show_progress) as bar:
            bar.update(done)
            started = set()
            while not all(m.track.done for m in self.members):
                m = self._next_member()
                if m.name not in started:  # the epoch this member trains first in this process
                    started.add(m.name)
                    m.health.on_epoch_start(m.track.epoch + 1, m.unit.updates, m.unit.batch_size)
                bar.update(self._step(m))
                if m.stream.epoch_done:
                    self._end_epoch(m)  # writes last.pt: the last epoch end leaves the finished run's state

    def _next_member(self) -> Member:
        if self.strategy == SEQUENTIAL:
            return next(m for m in self.members if not m.track.done)
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
        loader_batches = max(1, m.unit.global_batch // (m.stream.batch_size * m.stream.world))
        window, consumed = m.stream.next_window(loader_batches)
        t1 = time.perf_counter()
        if not window and not self.comm.active:  # nothing readable here (or the epoch ran dry): nothing to step on
            return consumed
        stepped = m.guard.step(window, m.unit.updates + 1, m.track.epoch + 1, self._save_emergency)
        if stepped is None:  # OOM S3: the window's samples are re-fed at the new global batch
            m.stream.rewind(consumed)
            m.stream.set_batch_size(m.unit.batch_size)
            log.warning("%s continues at batch %d x accum %d (global batch %d); the failed window's samples are "
                        "replayed", m.name, m.unit.batch_size, m.unit.accum, m.unit.global_batch)
            return 0
        loss, samples = stepped
        if not samples:  # no rank had a readable sample in these positions
            return consumed
        self.tick += 1
        self._after_step(m, loss, samples, t1 - t0, time.perf_counter() - t1)
        return consumed

    def _after_step(self, m: Member, loss: float, samples: int, data_time: float, compute_time: float) -> None:
        t = m.track
        t.steps_in_epoch += 1
        t.loss_sum, t.loss_count = t.loss_sum + loss, t.loss_count + 1
        for key, value in getattr(m.unit, "last_items", {}).items():
            t.item_sums[key] = t.item_sums.get(key, 0.0) + value
        m.telemetry.step(m.unit.updates, t.epoch + 1, t.steps_in_epoch, m.steps_now, loss, m.unit.lr, samples,
                         data_time, compute_time)
        m.health.on_step(m.unit.updates, loss)
        if self.checkpoints.recovery_due(self.tick):
            self._save("recovery.pt")
        if self.step_hook is not None:
            self.step_hook(self.tick, loss, m.name)
        self._maybe_simulate_crash()

    def _maybe_simulate_crash(self) -> None:
        at = self.cfg.train.crash_at_step
        if at is None or self.tick != at:
            return
        marker = self.checkpoints.dir / f".simulated_crash_{at}"  # fail once: the retry must get past this step
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise SimulatedCrash(f"train.crash_at_step={at}: simulated crash after global step {at}")

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self, m: Member) -> None:
        u, t = m.unit, m.track
        self._average_buffers()
        metrics = u.validate(self.comm)  # every rank its slice; the same metrics everywhere
        value = metrics.get(u.monitor)
        record = {"epoch": t.epoch + 1, "global_step": u.updates, "train_loss": t.loss_sum / max(1, t.loss_count),
                  "train": {k: v / max(1, t.loss_count) for k, v in t.item_sums.items()}, "val": metrics,
                  "lr": u.lr, "batch_size": u.batch_size, "grad_accum": u.accum,
                  "resources": self._every_rank(m.telemetry.end_epoch())}
        t.history.append(record)
        m.telemetry.validation({k: metrics.get(k) for k in VAL_LOG_KEYS.get(u.name, ())}, u.updates)
        m.telemetry.scalars({f"train/{k}": v for k, v in record["train"].items()}, u.updates)
        shown = " ".join(f"{k}={_fmt(metrics.get(k))}" for k in VAL_LOG_KEYS.get(u.name, ()))
        log.info("%s val e=%d %s n=%s", u.log_tag, t.epoch + 1, shown, metrics.get("n", metrics.get("n_images")))
        if self.checkpoints.is_new_best(m.name, value, u.mode, t.epoch + 1):
            self._save_weights(m, layout.BEST, record)
        m.health.on_epoch_end(t.epoch + 1, value)
        t.epoch += 1
        t.steps_in_epoch, t.loss_sum, t.loss_count, t.item_sums = 0, 0.0, 0, {}
        if m.stopping.update(value):
            log.info("%s early stopping: %s", m.name, m.stopping.describe())
        t.done = m.stopping.stopped or t.epoch >= u.epochs
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

    def _every_rank(self, own: Dict[str, Any]) -> Dict[str, Any]:
        return over_ranks(own, self.comm.gather(own)) if self.comm.active else own

    # ------------------------------------------------------------------ files
    def _payload(self) -> Dict[str, Any]:
        p = self.primary
        units = {}
        for m in self.members:
            state = m.unit.state_dict(with_model=m is not p)
            state["meta_json"] = json.dumps(m.meta())
            units[m.name] = state
        best, _ = self.checkpoints.best_of(p.name)
        return {"model": p.unit.model.state_dict(), **p.unit.identity(), "units": units, "strategy": self.strategy,
                "global_step": self.tick, "epoch": p.track.epoch, "best_metric": best,
                "checkpoint_policy": self.checkpoints.state_dict(), "rng": self.comm.gather(rng_state()),
                "world_size": self.comm.world_size}

    def _save(self, name: str) -> Path:
        self._average_buffers()  # what rank 0 saves is every rank's state, so a resume matches an uninterrupted run
        return self.checkpoints.save(name, self._payload())

    def _average_buffers(self) -> None:
        """BatchNorm running statistics are each rank's own (training uses batch statistics): their mean, before
        validating or saving (timm's distribute_bn); nothing with one process."""
        for m in self.members:
            self.comm.average_buffers(m.unit.model)
            if m.unit.ema is not None:
                self.comm.average_buffers(m.unit.ema.module)

    def _save_emergency(self) -> Path:
        return self._save("emergency.pt")

    def _save_weights(self, m: Member, name: str, record: Dict[str, Any]) -> Path:
        best, _ = self.checkpoints.best_of(m.name)
        payload = {**m.unit.weights_payload(), "epoch": record["epoch"], "global_step": m.unit.updates,
                   "best_metric": best, "monitor": m.unit.monitor, "strategy": self.strategy,
                   "val_metrics_json": json.dumps(record["val"], default=str)}
        if name == layout.BEST:
            return self.checkpoints.save_best(m.name, payload, m.checkpoints_dir)
        return self.checkpoints.save(name, payload, directory=m.checkpoints_dir)

    def _write_metrics(self, m: Member) -> None:
        if not self.comm.is_main:
            return
        doc = read_json(self.reports) if self.reports.is_file() else {}
        doc[m.section] = {"latest": m.track.history[-1], "history": m.track.history}
        write_json_atomic(self.reports, doc)

    def _log_settings(self, m: Member) -> None:
        u = m.unit
        log.info("%s run (%s): micro-batch %d x accum %d = global %d, loader batch %d, eval batch %d, %d workers, "
                 "%s, compile %s, grad clip %s, EMA %s, %d train samples, %d epochs of %d samples", u.name,
                 self.strategy, u.batch_size, u.accum, u.global_batch, m.stream.batch_size, u.eval_batch_size,
                 m.stream.num_workers, u.policy.describe(), u.train_model.state, u.grad_clip or "off",
                 "on" if u.ema is not None else "off", len(m.data.dataset), u.epochs, m.stream.samples_per_epoch)

    def _result(self, m: Member, resumed: Optional[int]) -> TrainResult:
        u, t = m.unit, m.track
        best_metric, best_epoch = self.checkpoints.best_of(m.name)
        best = next((h for h in t.history if h["epoch"] == best_epoch), None)
        val = dict(best["val"]) if best else {}
        return TrainResult(
            model=u.name, strategy=self.strategy, backbone=u.identity()["backbone"],
            best_checkpoint=str(m.best_path), best_sha256=self.checkpoints.best_sha256(m.name),
            fingerprint=self.checkpoints.fingerprint, data_identity=dict(self.data_identity),
            world_size=self.comm.world_size,
            last_checkpoint=str(m.checkpoints_dir / layout.LAST),
            monitor=u.monitor, best_metric=best_metric, best_epoch=best_epoch, epochs_completed=t.epoch,
            epochs_planned=u.epochs, global_step=u.updates, resumed_from_step=resumed,
            stopped_early=m.stopping.stopped, val_metrics=val, history=t.history,
            epochs=epoch_rows(t.history, u.monitor), mean_throughput=mean_throughput(t.history),
            skipped_samples=SkipCounter.skipped if u.name == "classifier" else 0,
            class_map_hash=u.identity()["class_map_hash"], policy=u.policy.describe(),
            batch_size=u.batch_size, grad_accum=u.accum, oom_events=list(m.guard.events),
            auto_batch=m.plans["batch"], num_workers=m.plans["workers"], warnings=m.health.summary(),
            tensorboard=str(m.tensorboard), compile=u.train_model.state,
            not_measured=[] if best_metric is not None else [u.monitor], data=dict(m.facts))


VAL_LOG_KEYS = {"classifier": ("val_loss", "accuracy", "macro_f1", "top5"),
                "detector": ("mAP_0.5", "mAP_0.5_0.95", "precision", "recall")}


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"
