"""Applying the auto-batch plan (D-4 / Annex 1) and the worker plan (Annex 2) to the classifier trainer.

A plan is given (computed and cached by the orchestrator: tuning.tune_batch / tune_workers) or measured here
when the config asks for it. A resumed run keeps the checkpoint's batch, accumulation and workers: re-tuning
mid-run would change the math of a run that is half done.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

from pillsnap.train.oom import OomState, scale_optimizer_hparams
from pillsnap.train.steps import amp_name
from pillsnap.train.tuning_probes import batch_plan_from_search, worker_plan_from_measurement

log = logging.getLogger(__name__)


class PlanMixin:
    """The tuning half of ClassifierTrainer."""

    def _prepare_knobs(self, resumed: bool) -> None:
        cfg = self.cfg
        if resumed:
            if self.batch_plan is not None or self.worker_plan is not None:
                log.info("resumed run: keeping the checkpoint's batch %d x accum %d and %d workers; the given "
                         "plans are not applied", self.batch_size, self.accum, self.num_workers)
        else:
            plan = self.batch_plan
            if plan is None and cfg.train.classification.auto_batch_tune:
                plan = batch_plan_from_search(self)
            if plan is not None:
                self.apply_batch_plan(plan)
            workers = self.worker_plan
            if workers is None and cfg.dataloader.autotune_workers:
                workers = worker_plan_from_measurement(cfg, self.data, self.batch_size)
            if workers is not None:
                self.apply_worker_plan(workers)
        self._log_run_settings()

    def apply_batch_plan(self, plan: Dict[str, Any]) -> None:
        """Train at the plan's batch / accumulation / eval batch (before the first step only)."""
        if self.state.global_step:
            raise RuntimeError("a batch plan can only be applied before training starts")
        tc = self.cfg.train
        configured_global = tc.classification.batch_size * max(1, tc.grad_accum_steps)
        self.batch_size, self.accum = int(plan["batch_size"]), int(plan["grad_accum"])
        self.eval_batch_size = int(plan.get("eval_batch_size") or self.batch_size)
        self._plan_schedule()
        # Linear scaling rule against THIS config's global batch (a cached plan may come from another one).
        lr_scale = self.batch_size * self.accum / configured_global
        if lr_scale != 1.0:
            scale_optimizer_hparams(self.optimizer, self.scheduler, lr_scale=lr_scale)
        amp = plan.get("amp_dtype", self.oom.state.amp_dtype)
        escalated = amp == "fp16" and self.oom.state.amp_dtype != "fp16"
        if escalated:
            self._escalate_precision()
        self.oom.state = OomState(self.batch_size, self.accum, amp_name(self.policy.amp_dtype),
                                  did_amp_escalate=escalated)
        self._loaders.clear()
        self.applied_batch_plan = {**plan, "applied_lr_scale": lr_scale}
        for tag, value in (("perf/auto_batch_found", self.batch_size), ("perf/auto_batch_grad_accum", self.accum),
                           ("perf/auto_batch_eval", self.eval_batch_size),
                           ("perf/auto_batch_memory_fraction", plan.get("memory_fraction"))):
            self.tb.scalar(tag, value, self.state.global_step)
        source = "probed on " + str(plan.get("device")) if plan.get("probed") else "not probed"
        log.info("auto batch: training at batch %d x accum %d (global %d, configured %d, lr x%.4f), eval batch %d "
                 "(%s)", self.batch_size, self.accum, self.batch_size * self.accum, configured_global, lr_scale,
                 self.eval_batch_size, source)

    def apply_worker_plan(self, plan: Dict[str, Any]) -> None:
        self.num_workers = int(plan["num_workers"])
        self._loaders.clear()
        self.applied_worker_plan = dict(plan)
        self.tb.scalar("perf/num_workers", self.num_workers, self.state.global_step)
        for workers, ms in plan.get("data_time_ms", {}).items():
            self.tb.scalar(f"perf/worker_autotune_data_time_ms/{workers}", ms, self.state.global_step)
        log.info("dataloader: %d workers (%s)", self.num_workers, plan.get("reason", "plan given"))

    def _log_run_settings(self) -> None:
        """What really runs (the config may say otherwise after tuning, a stage override or a resume)."""
        st = self.oom.state
        log.info("classifier run: batch %d x accum %d = global %d, eval batch %d, %d workers, micro-batch %d, "
                 "%s, %d train / %d val images, %d classes", self.batch_size, self.accum,
                 self.batch_size * self.accum, self.eval_batch_size, self.num_workers, st.batch_size,
                 self.policy.describe(), len(self.train_ds), len(self.val_ds), len(self.labels))
