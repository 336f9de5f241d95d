"""The classifier training loop: the whole GPU job that one orchestration task runs (D-5, D-6, D-7).

AMP / channels_last / compile per the policy, gradient accumulation with clipping after unscale, a cosine
schedule stepped per optimizer step, optional EMA, fp32 validation, early stopping, and atomic checkpoints:
last.pt every epoch, best.pt on improvement, recovery.pt every N optimizer steps. With train.resume=last the
newest valid checkpoint is loaded and training continues at the exact sample where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import torch

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.data.cache import build_cache
from pillsnap.data.class_map import ClassMap
from pillsnap.data.datasets import (ClassificationDataset, EpochSampler, SkipCounter, classification_samples,
                                    make_loader)
from pillsnap.evaluate.metrics import classification_metrics
from pillsnap.models.classifier import build_classifier
from pillsnap.progress import progress
from pillsnap.train.checkpoints import (check_compatible, find_resume_checkpoint, load_checkpoint,
                                        restore_rng_state, rng_state, save_checkpoint)
from pillsnap.train.loss import build_criterion, sample_weights
from pillsnap.train.policy import apply_global_settings, prepare_model, resolve_policy, set_seed, try_compile
from pillsnap.train.schedule import warmup_cosine
from pillsnap.train.tb import TBWriter
from pillsnap.train.warm_start import warm_start_from

log = logging.getLogger(__name__)
StepHook = Callable[[int], None]  # called after every optimizer step with the global step (fault injection, UI)


class SimulatedCrash(RuntimeError):
    """Raised by train.crash_at_step style hooks to test retries; never raised in a normal run."""


@dataclass
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    monitor: str
    best_metric: Optional[float]
    best_epoch: int
    epochs_completed: int
    global_step: int
    resumed_from_step: Optional[int]
    stopped_early: bool
    val_metrics: Dict
    history: List[Dict] = field(default_factory=list)
    mean_throughput: float = 0.0
    skipped_samples: int = 0
    class_map_hash: str = ""
    policy: str = ""


@dataclass
class _State:
    epoch: int = 0
    samples_in_epoch: int = 0
    global_step: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: List[Dict] = field(default_factory=list)


class ClassifierTrainer:
    def __init__(self, cfg: PillSnapConfig, subset: pd.DataFrame, label_space: ClassMap, out_dir: Path,
                 init_checkpoint: Optional[Path] = None, step_hook: Optional[StepHook] = None,
                 show_progress: bool = True):
        self.cfg, self.labels, self.out = cfg, label_space, Path(out_dir)
        self._config_json = json.dumps(to_dict(cfg))  # resolved once: serialising the config is slow
        self.ckpt_dir = self.out / "checkpoints"
        self.step_hook, self.show_progress = step_hook, show_progress
        tc = cfg.train
        set_seed(tc.seed, tc.deterministic)
        self.policy = resolve_policy(cfg.optimization)
        apply_global_settings(self.policy, tc.deterministic)
        log.info("classifier policy: %s", self.policy.describe())
        self._build_data(subset)
        self.model = prepare_model(build_classifier(cfg.classification, len(label_space)), self.policy)
        if init_checkpoint is not None:
            warm_start_from(self.model, load_checkpoint(init_checkpoint), label_space,
                            cfg.classification.backbone)
        self.train_model = try_compile(self.model, self.policy.compile_mode)
        self.criterion = build_criterion(cfg.loss, self.train_data.labels, len(label_space)).to(self.policy.device)
        self.accum = max(1, tc.grad_accum_steps)
        self.batch_size = tc.classification.batch_size
        fused = self.policy.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.classification.lr,
                                           weight_decay=tc.weight_decay, fused=fused)
        self.steps_per_epoch = self._optimizer_steps_per_epoch()
        self.scheduler = warmup_cosine(self.optimizer, self.steps_per_epoch * tc.classification.epochs,
                                       tc.warmup_steps, tc.scheduler)
        self.scaler = torch.amp.GradScaler(self.policy.device.type, enabled=self.policy.use_scaler)
        self.ema = self._build_ema()
        self.state = _State()
        self._throughputs: List[float] = []
        self._loaders: Dict[bool, torch.utils.data.DataLoader] = {}
        self.tb = TBWriter(self.out / "tb", cfg.logging.tensorboard)

    # ---------------------------------------------------------------- data
    def _build_data(self, subset: pd.DataFrame) -> None:
        cfg = self.cfg
        include_crops = cfg.data.include_combination_crops
        self.train_data = classification_samples(subset[subset["split"] == "train"], self.labels, include_crops)
        self.val_data = classification_samples(subset[subset["split"] == "val"], self.labels, include_crops)
        if not self.train_data.samples:
            raise ValueError("the stage subset has no training images for the classifier")
        size, pad = cfg.classification.image_size, cfg.classification.crop_padding
        caches = [None, None]
        if cfg.dataloader.cache.enabled:
            cache_dir = Path(cfg.dataloader.cache.dir or cfg.exp_dir / "data" / "cache")
            caches = [build_cache(d.samples, size, cache_dir, pad, show_progress=self.show_progress)
                      for d in (self.train_data, self.val_data)]
        self.train_ds = ClassificationDataset(self.train_data, size, True, caches[0], pad)
        self.val_ds = ClassificationDataset(self.val_data, size, False, caches[1], pad)
        weights = (sample_weights(self.train_data.labels, len(self.labels)) if cfg.loss.weighted_sampler else None)
        self.sampler = EpochSampler(len(self.train_ds), cfg.train.seed, weights)

    def _loader(self, train: bool):
        # Built once: persistent workers survive epochs; the sampler's epoch is read at each iteration.
        if train not in self._loaders:
            ds = self.train_ds if train else self.val_ds
            self._loaders[train] = make_loader(ds, self.batch_size, self.cfg.dataloader, train,
                                               self.sampler if train else None)
        return self._loaders[train]

    def _optimizer_steps_per_epoch(self) -> int:
        n = len(self.train_ds)
        batches = n // self.batch_size if self.cfg.dataloader.drop_last and n >= self.batch_size else \
            math.ceil(n / self.batch_size)
        cap = self.cfg.train.max_steps_per_epoch
        steps = max(1, batches // self.accum)
        return min(steps, cap) if cap else steps

    def _build_ema(self):
        if not self.cfg.train.ema.enabled:
            return None
        from timm.utils import ModelEmaV3
        return ModelEmaV3(self.model, decay=self.cfg.train.ema.decay)

    # ---------------------------------------------------------------- checkpoints
    def _payload(self) -> Dict:
        s = self.state
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": s.epoch, "samples_in_epoch": s.samples_in_epoch, "global_step": s.global_step,
            "best_metric": s.best_metric, "best_epoch": s.best_epoch, "bad_epochs": s.bad_epochs,
            "loss_sum": s.loss_sum, "loss_count": s.loss_count, "history_json": json.dumps(s.history),
            "config": self._config_json, "backbone": self.cfg.classification.backbone,
            "num_classes": len(self.labels), "class_map_hash": self.labels.hash, "k_codes": self.labels.k_codes,
            "image_size": self.cfg.classification.image_size, "batch_size": self.batch_size,
            "grad_accum": self.accum, "rng": rng_state(),
        }

    def _save(self, name: str) -> Path:
        return save_checkpoint(self.ckpt_dir / name, self._payload(), keep_previous=(name == "last.pt"))

    def _resume(self) -> Optional[int]:
        if self.cfg.train.resume != "last":
            return None
        found = find_resume_checkpoint(self.ckpt_dir)
        if found is None:
            log.info("train.resume=last: no checkpoint in %s, starting fresh", self.ckpt_dir)
            return None
        path, p = found
        check_compatible(p, self.cfg.classification.backbone, len(self.labels), self.labels.hash, path)
        self.model.load_state_dict(p["model"])
        self.optimizer.load_state_dict(p["optimizer"])
        self.scheduler.load_state_dict(p["scheduler"])
        self.scaler.load_state_dict(p["scaler"])
        if self.ema is not None and p.get("ema") is not None:
            self.ema.module.load_state_dict(p["ema"])
        self.state = _State(p["epoch"], p["samples_in_epoch"], p["global_step"], p["best_metric"], p["best_epoch"],
                            p["bad_epochs"], p["loss_sum"], p["loss_count"], json.loads(p["history_json"]))
        restore_rng_state(p["rng"])
        return self.state.global_step

    # ---------------------------------------------------------------- training
    def run(self) -> TrainResult:
        resumed = self._resume()
        tc = self.cfg.train
        epochs = tc.classification.epochs
        stopped_early = False
        total = self.steps_per_epoch * epochs
        with progress(total=total, desc="train classifier", unit="step", enabled=self.show_progress) as bar:
            bar.update(min(self.state.global_step, total))
            while self.state.epoch < epochs and not stopped_early:
                self._train_epoch(bar)
                stopped_early = self._end_epoch()
        self.tb.close()
        return self._result(resumed, stopped_early)

    def _train_epoch(self, bar) -> None:
        s, tc = self.state, self.cfg.train
        self.sampler.set_epoch(s.epoch, s.samples_in_epoch)
        self.train_model.train()
        micro, step_in_epoch = 0, (s.samples_in_epoch // self.batch_size) // self.accum
        t_data = time.perf_counter()
        data_time = compute_time = 0.0
        for batch in self._loader(train=True):
            if step_in_epoch >= self.steps_per_epoch:
                break
            if batch is None:
                continue
            t_comp = time.perf_counter()
            data_time += t_comp - t_data
            loss = self._forward_backward(batch)
            s.samples_in_epoch += len(batch[1])
            micro += 1
            if micro % self.accum:
                t_data = time.perf_counter()
                continue
            self._optimizer_step()
            step_in_epoch += 1
            s.global_step += 1
            s.loss_sum, s.loss_count = s.loss_sum + loss, s.loss_count + 1
            compute_time += time.perf_counter() - t_comp
            self._log_step(step_in_epoch, loss, data_time, compute_time)
            data_time = compute_time = 0.0
            bar.update()
            if tc.recovery_every_steps and s.global_step % tc.recovery_every_steps == 0:
                self._save("recovery.pt")
            if self.step_hook is not None:
                self.step_hook(s.global_step)
            self._maybe_simulate_crash()
            t_data = time.perf_counter()

    def _maybe_simulate_crash(self) -> None:
        at = self.cfg.train.crash_at_step
        if at is None or self.state.global_step != at:
            return
        marker = self.ckpt_dir / f".simulated_crash_{at}"  # fail once: the retry must get past this step
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise SimulatedCrash(f"train.crash_at_step={at}: simulated crash after global step {at}")

    def _forward_backward(self, batch) -> float:
        x, y, _ = batch
        dev = self.policy.device
        x = x.to(dev, non_blocking=True)
        if self.policy.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=self.policy.amp_dtype or torch.float32,
                            enabled=self.policy.amp_dtype is not None):
            loss = self.criterion(self.train_model(x), y)
        if not torch.isfinite(loss):
            self._save("emergency.pt")
            raise FloatingPointError(f"non-finite loss {loss.item()} at global step {self.state.global_step}, "
                                     f"epoch {self.state.epoch}, sample offset {self.state.samples_in_epoch}")
        self.scaler.scale(loss / self.accum).backward()
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=self.cfg.train.zero_grad_set_to_none)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step)

    def _log_step(self, step_in_epoch: int, loss: float, data_time: float, compute_time: float) -> None:
        s, tc = self.state, self.cfg.train
        eff = self.batch_size * self.accum
        thr = eff / max(1e-9, data_time + compute_time)
        lr = self.optimizer.param_groups[0]["lr"]
        cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if self.policy.device.type == "cuda" else 0.0
        for tag, value in (("train/loss", loss), ("train/lr", lr), ("perf/data_time", data_time),
                           ("perf/compute_time", compute_time), ("perf/throughput", thr), ("perf/cuda_mem", cuda_mb)):
            self.tb.scalar(tag, value, s.global_step)
        if step_in_epoch % max(1, tc.step_log_interval) == 0 or step_in_epoch == self.steps_per_epoch:
            log.info("[train] e=%d/%d s=%d/%d loss=%.4f lr=%.2e data=%.3fs comp=%.3fs thr=%.1f/s cuda=%.0fMB",
                     s.epoch + 1, tc.classification.epochs, step_in_epoch, self.steps_per_epoch, loss, lr,
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
        s.epoch += 1
        s.samples_in_epoch, s.loss_sum, s.loss_count = 0, 0.0, 0
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
            skipped_samples=SkipCounter.skipped, class_map_hash=self.labels.hash, policy=self.policy.describe())


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def train_classifier(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, out_dir: Path,
                     init_checkpoint: Optional[Path] = None, step_hook: Optional[StepHook] = None,
                     show_progress: bool = True) -> TrainResult:
    """Train on the stage subset; the label space is the global class map restricted to the subset's classes."""
    k_codes = sorted({k for k in subset.loc[subset["kind"] == "single", "k_code"]})
    trainer = ClassifierTrainer(cfg, subset, class_map.restrict(k_codes), out_dir, init_checkpoint, step_hook,
                                show_progress)
    return trainer.run()


def result_dict(result: TrainResult) -> Dict:
    out = asdict(result)
    out.pop("history")
    return out
