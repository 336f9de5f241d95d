"""The classifier training loop: the whole GPU job that one orchestration task runs (D-5, D-6, D-7, D-8).

AMP / channels_last / compile per the policy, gradient accumulation with clipping after unscale, a cosine
schedule stepped per optimizer step (counted in samples once an OOM changes the global batch), optional EMA,
fp32 validation, early stopping, and atomic checkpoints: last.pt every epoch, best.pt on improvement,
recovery.pt every N optimizer steps, emergency.pt when a run must stop. With train.resume=last the newest valid
checkpoint is loaded and training continues at the exact sample where it stopped, with the batch size,
accumulation and precision that OOM recovery had reached.

Before training: the auto-batch plan (D-4) and the worker plan (Annex 2) are applied, given or measured (see
tuning.py). Each optimizer step runs under OOM recovery (steps.py); loss spikes, plateaus and GPU memory are
watched (health.py).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import torch

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.data.class_map import ClassMap
from pillsnap.data.datasets import SkipCounter, make_loader
from pillsnap.evaluate.metrics import classification_metrics
from pillsnap.models.classifier import build_classifier
from pillsnap.progress import progress
from pillsnap.train.checkpoints import load_checkpoint, save_checkpoint
from pillsnap.train.classifier_data import build_classifier_data, stage_label_space
from pillsnap.train.health import TrainingHealth
from pillsnap.train.loss import build_criterion
from pillsnap.train.oom import FaultInjector, OomPolicy, OomRecovery, OomState, configure_cuda_allocator
from pillsnap.train.plans import PlanMixin
from pillsnap.train.trainer_checkpoints import CheckpointMixin
from pillsnap.train.policy import apply_global_settings, prepare_model, resolve_policy, set_seed, try_compile
from pillsnap.train.sample_schedule import sample_based_cosine
from pillsnap.train.steps import TrainStepMixin, amp_name
from pillsnap.train.tb import TBWriter
from pillsnap.train.train_state import ClassifierState, TrainResult
from pillsnap.train.warm_start import warm_start_from

log = logging.getLogger(__name__)
StepHook = Callable[[int], None]  # called after every optimizer step with the global step (fault injection, UI)

__all__ = ["ClassifierTrainer", "SimulatedCrash", "TrainResult", "result_dict", "train_classifier"]


class SimulatedCrash(RuntimeError):
    """Raised by train.crash_at_step style hooks to test retries; never raised in a normal run."""


class ClassifierTrainer(TrainStepMixin, PlanMixin, CheckpointMixin):
    def __init__(self, cfg: PillSnapConfig, subset: pd.DataFrame, label_space: ClassMap, out_dir: Path,
                 init_checkpoint: Optional[Path] = None, step_hook: Optional[StepHook] = None,
                 show_progress: bool = True, batch_plan: Optional[Dict] = None, worker_plan: Optional[Dict] = None,
                 fault_injector: Optional[FaultInjector] = None):
        """batch_plan / worker_plan: dicts from tuning.tune_batch / tune_workers, applied instead of measuring."""
        self.cfg, self.labels, self.out = cfg, label_space, Path(out_dir)
        self._config_json = json.dumps(to_dict(cfg))  # resolved once: serialising the config is slow
        self.ckpt_dir = self.out / "checkpoints"
        self.step_hook, self.show_progress = step_hook, show_progress
        tc = cfg.train
        if torch.cuda.is_available() and not torch.cuda.is_initialized():
            configure_cuda_allocator()  # expandable segments: less fragmentation, fewer OOMs (read at first use)
        set_seed(tc.seed, tc.deterministic)
        self.policy = resolve_policy(cfg.optimization)
        apply_global_settings(self.policy, tc.deterministic)
        log.info("classifier policy: %s", self.policy.describe())
        self.data = build_classifier_data(cfg, subset, label_space, show_progress)
        self.train_data, self.val_data = self.data.train_data, self.data.val_data
        self.train_ds, self.val_ds, self.sampler = self.data.train_ds, self.data.val_ds, self.data.sampler
        self.model = prepare_model(build_classifier(cfg.classification, len(label_space)), self.policy)
        if init_checkpoint is not None:
            warm_start_from(self.model, load_checkpoint(init_checkpoint), label_space,
                            cfg.classification.backbone)
        self.train_model = try_compile(self.model, self.policy.compile_mode)
        self.criterion = build_criterion(cfg.loss, self.train_data.labels, len(label_space)).to(self.policy.device)
        self.accum = max(1, tc.grad_accum_steps)
        self.batch_size = self.eval_batch_size = tc.classification.batch_size
        self.num_workers = cfg.dataloader.num_workers
        fused = self.policy.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.classification.lr,
                                           weight_decay=tc.weight_decay, fused=fused)
        self._plan_schedule()
        self.scaler = torch.amp.GradScaler(self.policy.device.type, enabled=self.policy.use_scaler)
        self.ema = self._build_ema()
        self.state = ClassifierState()
        self._throughputs: List[float] = []
        self._loaders: Dict[bool, torch.utils.data.DataLoader] = {}
        self.tb = TBWriter(self.out / "tb", cfg.logging.tensorboard)
        self.oom = OomRecovery(OomPolicy.from_config(tc.oom),
                               OomState(self.batch_size, self.accum, amp_name(self.policy.amp_dtype)))
        self.injector = fault_injector or FaultInjector.from_sources(tc.oom.inject_at_steps)
        self.oom_events: List[Dict] = []
        self.health = TrainingHealth(cfg, self.tb)
        self.batch_plan, self.worker_plan = batch_plan, worker_plan
        self.applied_batch_plan: Optional[Dict] = None
        self.applied_worker_plan: Optional[Dict] = None

    # ---------------------------------------------------------------- data and schedule
    def _loader(self, train: bool):
        # Built once: persistent workers survive epochs; the sampler's epoch is read at each iteration.
        if train not in self._loaders:
            ds = self.train_ds if train else self.val_ds
            self._loaders[train] = make_loader(ds, self.batch_size if train else self.eval_batch_size,
                                               self.cfg.dataloader, train, self.sampler if train else None,
                                               num_workers=self.num_workers)
        return self._loaders[train]

    def _drop_train_loader(self) -> None:
        loader = self._loaders.pop(True, None)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # persistent workers would otherwise live until garbage collection

    def _optimizer_steps_per_epoch(self) -> int:
        n = len(self.train_ds)
        batches = n // self.batch_size if self.cfg.dataloader.drop_last and n >= self.batch_size else \
            math.ceil(n / self.batch_size)
        cap = self.cfg.train.max_steps_per_epoch
        steps = max(1, batches // self.accum)
        return min(steps, cap) if cap else steps

    def _plan_schedule(self) -> None:
        """Steps per epoch and the LR schedule for the current batch x accumulation (before any step)."""
        tc = self.cfg.train
        self.steps_per_epoch = self._optimizer_steps_per_epoch()
        self.scheduler = sample_based_cosine(self.optimizer, self.steps_per_epoch * tc.classification.epochs,
                                             tc.warmup_steps, tc.scheduler, self.batch_size * self.accum)

    def _build_ema(self):
        if not self.cfg.train.ema.enabled:
            return None
        from timm.utils import ModelEmaV3
        return ModelEmaV3(self.model, decay=self.cfg.train.ema.decay)

    # ---------------------------------------------------------------- training
    def run(self) -> TrainResult:
        resumed = self._resume()
        self._prepare_knobs(resumed is not None)
        s, tc = self.state, self.cfg.train
        if not s.epoch_positions:
            s.reference_global_batch = self.batch_size * self.accum
            s.epoch_positions = self.steps_per_epoch * s.reference_global_batch
        epochs = tc.classification.epochs
        stopped_early = False
        total = (s.epoch_positions // s.reference_global_batch) * epochs
        with progress(total=total, desc="train classifier", unit="step", enabled=self.show_progress) as bar:
            self._update_bar(bar)
            while s.epoch < epochs and not stopped_early:
                self._train_epoch(bar)
                stopped_early = self._end_epoch()
        self.tb.close()
        self.health.close()
        return self._result(resumed, stopped_early)

    def _train_epoch(self, bar) -> None:
        s = self.state
        self.health.on_epoch_start(s.epoch + 1, s.global_step, self.batch_size)
        self.train_model.train()
        while s.samples_in_epoch < s.epoch_positions:
            self.sampler.set_epoch(s.epoch, s.samples_in_epoch)
            if not self._train_until_rewind(bar):
                break
            # OOM S3 changed the global batch: a new loader replays from the failed window's first sample.

    def _train_until_rewind(self, bar) -> bool:
        """Optimizer steps until the epoch ends (False) or OOM recovery asks for a new loader (True)."""
        s, n = self.state, len(self.train_ds)
        window, consumed = [], 0
        t_data = time.perf_counter()
        for batch in self._loader(train=True):
            consumed += min(self.batch_size, n - s.samples_in_epoch - consumed)
            if batch is not None:  # every sample unreadable: safe_collate dropped them all
                window.append(batch)
            if len(window) < self.accum:
                continue
            t_comp = time.perf_counter()
            loss = self.train_step(window)
            if loss is None:
                return True
            s.samples_in_epoch += consumed
            self._after_step(bar, loss, sum(len(b[1]) for b in window), t_comp - t_data,
                             time.perf_counter() - t_comp)
            if s.samples_in_epoch >= s.epoch_positions:
                return False
            window, consumed = [], 0
            t_data = time.perf_counter()
        return False

    def _after_step(self, bar, loss: float, samples: int, data_time: float, compute_time: float) -> None:
        s, tc = self.state, self.cfg.train
        s.steps_in_epoch += 1
        s.loss_sum, s.loss_count = s.loss_sum + loss, s.loss_count + 1
        self._log_step(loss, samples, data_time, compute_time)
        self.health.on_step(s.global_step, loss)
        self._update_bar(bar)
        if tc.recovery_every_steps and s.global_step % tc.recovery_every_steps == 0:
            self._save("recovery.pt")
        if self.step_hook is not None:
            self.step_hook(s.global_step)
        self._maybe_simulate_crash()

    def _update_bar(self, bar) -> None:
        s = self.state
        done = (s.epoch * s.epoch_positions + s.samples_in_epoch) // max(1, s.reference_global_batch)
        if done > bar.done:
            bar.update(done - bar.done)

    def _maybe_simulate_crash(self) -> None:
        at = self.cfg.train.crash_at_step
        if at is None or self.state.global_step != at:
            return
        marker = self.ckpt_dir / f".simulated_crash_{at}"  # fail once: the retry must get past this step
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise SimulatedCrash(f"train.crash_at_step={at}: simulated crash after global step {at}")

    def _log_step(self, loss: float, samples: int, data_time: float, compute_time: float) -> None:
        s, tc = self.state, self.cfg.train
        thr = samples / max(1e-9, data_time + compute_time)
        lr = self.optimizer.param_groups[0]["lr"]
        cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if self.policy.device.type == "cuda" else 0.0
        for tag, value in (("train/loss", loss), ("train/lr", lr), ("perf/data_time", data_time),
                           ("perf/compute_time", compute_time), ("perf/throughput", thr), ("perf/cuda_mem", cuda_mb)):
            self.tb.scalar(tag, value, s.global_step)
        steps_now = max(1, math.ceil(s.epoch_positions / (self.batch_size * self.accum)))
        if s.steps_in_epoch % max(1, tc.step_log_interval) == 0 or s.steps_in_epoch == steps_now:
            log.info("[train] e=%d/%d s=%d/%d loss=%.4f lr=%.2e data=%.3fs comp=%.3fs thr=%.1f/s cuda=%.0fMB",
                     s.epoch + 1, tc.classification.epochs, s.steps_in_epoch, steps_now, loss, lr,
                     data_time, compute_time, thr, cuda_mb)
        self._throughputs.append(thr)

    # ---------------------------------------------------------------- validation and epoch end
    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> Dict:
        model.eval()
        logits, labels, loss_sum = [], [], 0.0
        ce = torch.nn.CrossEntropyLoss(reduction="sum")
        for batch in self._loader(train=False):
            if batch is None:
                continue
            x, y, _ = batch
            out = model(x.to(self.policy.device)).float()  # fp32 validation, no autocast
            loss_sum += float(ce(out, y.to(self.policy.device)))
            logits.append(out.cpu().numpy())
            labels.append(y.numpy())
        if not logits:
            return {"n": 0, "val_loss": None, "accuracy": None, "macro_f1": None, "top5": None}
        y_true, all_logits = np.concatenate(labels), np.concatenate(logits)
        metrics = classification_metrics(y_true, all_logits, self.labels.k_codes)
        metrics["val_loss"] = loss_sum / len(y_true)
        return metrics

    def _end_epoch(self) -> bool:
        s, tc = self.state, self.cfg.train
        metrics = self.validate(self.model)
        ema_metrics = self.validate(self.ema.module) if self.ema else None
        chosen = ema_metrics or metrics
        record = {"epoch": s.epoch + 1, "global_step": s.global_step,
                  "train_loss": s.loss_sum / max(1, s.loss_count), "val": metrics, "val_ema": ema_metrics}
        s.history.append(record)
        for tag, key in (("val/loss", "val_loss"), ("val/accuracy", "accuracy"), ("val/macro_f1", "macro_f1"),
                         ("val/top5", "top5")):
            self.tb.scalar(tag, metrics.get(key), s.global_step)
            if ema_metrics:
                self.tb.scalar(tag.replace("val/", "val_ema/"), ema_metrics.get(key), s.global_step)
        log.info("[val] e=%d loss=%s acc=%s macro_f1=%s top5=%s n=%d", s.epoch + 1, _fmt(chosen.get("val_loss")),
                 _fmt(chosen.get("accuracy")), _fmt(chosen.get("macro_f1")), _fmt(chosen.get("top5")), chosen["n"])
        improved = self._update_best(chosen.get(tc.early_stopping.monitor))
        self.health.on_epoch_end(s.epoch + 1, chosen.get(tc.early_stopping.monitor))
        s.epoch += 1
        s.samples_in_epoch, s.steps_in_epoch, s.loss_sum, s.loss_count = 0, 0, 0.0, 0
        if improved:
            self._save_best()
        self._save("last.pt")
        self._write_metrics_json()
        self.tb.flush()
        es = tc.early_stopping
        if es.enabled and s.bad_epochs >= es.patience:
            log.info("early stopping: %s did not improve by %s for %d epochs (best %s at epoch %d)",
                     es.monitor, es.min_delta, es.patience, _fmt(s.best_metric), s.best_epoch)
            return True
        return False

    def _update_best(self, value: Optional[float]) -> bool:
        s, es = self.state, self.cfg.train.early_stopping
        if value is None:
            s.bad_epochs += 1
            return False
        sign = 1 if es.mode == "max" else -1
        if s.best_metric is None or sign * (value - s.best_metric) > es.min_delta:
            s.best_metric, s.best_epoch, s.bad_epochs = float(value), s.epoch + 1, 0
            return True
        s.bad_epochs += 1
        return False

    def _save_best(self) -> None:
        payload = self._payload()
        if self.ema is not None:  # best.pt carries the weights that were evaluated
            payload["model"] = self.ema.module.state_dict()
        save_checkpoint(self.ckpt_dir / "best.pt", payload)

    def _write_metrics_json(self) -> None:
        path = self.out / "reports" / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        latest = self.state.history[-1]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"classification": {"latest": latest, "history": self.state.history}}, indent=1))
        tmp.replace(path)

    def _result(self, resumed: Optional[int], stopped_early: bool) -> TrainResult:
        s = self.state
        best_val = next((h["val_ema"] or h["val"] for h in s.history if h["epoch"] == s.best_epoch), {})
        return TrainResult(
            best_checkpoint=str(self.ckpt_dir / "best.pt"), last_checkpoint=str(self.ckpt_dir / "last.pt"),
            monitor=self.cfg.train.early_stopping.monitor, best_metric=s.best_metric, best_epoch=s.best_epoch,
            epochs_completed=s.epoch, global_step=s.global_step, resumed_from_step=resumed,
            stopped_early=stopped_early, val_metrics=best_val, history=s.history,
            mean_throughput=float(np.mean(self._throughputs)) if self._throughputs else 0.0,
            skipped_samples=SkipCounter.skipped, class_map_hash=self.labels.hash, policy=self.policy.describe(),
            batch_size=self.batch_size, grad_accum=self.accum, oom_events=list(self.oom_events),
            auto_batch=self.applied_batch_plan, num_workers=self.applied_worker_plan, warnings=self.health.summary())


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def train_classifier(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, out_dir: Path,
                     init_checkpoint: Optional[Path] = None, step_hook: Optional[StepHook] = None,
                     show_progress: bool = True, batch_plan: Optional[Dict] = None,
                     worker_plan: Optional[Dict] = None) -> TrainResult:
    """Train on the stage subset; the label space is the global class map restricted to the subset's classes.

    batch_plan / worker_plan: results of tuning.tune_batch / tune_workers (cached by the orchestrator); without
    them the trainer measures when cfg asks for it (auto_batch_tune, autotune_workers).
    """
    trainer = ClassifierTrainer(cfg, subset, stage_label_space(subset, class_map), out_dir, init_checkpoint,
                                step_hook, show_progress, batch_plan=batch_plan, worker_plan=worker_plan)
    return trainer.run()


def result_dict(result: TrainResult) -> Dict:
    """The JSON-serialisable result without the per-epoch history (that lives in reports/metrics.json)."""
    out = asdict(result)
    out.pop("history")
    return out
