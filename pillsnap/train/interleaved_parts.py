"""The two sides of the interleaved loop (D-1/D-5): a detector side and a classifier side, each with its own
data stream, optimizer (AdamW) and schedule, under one shared precision policy.

A stream cycles its loader forever and knows where it is (epoch, batch in epoch), so the smaller data set simply
comes round again, the loop can report how many epochs of each were seen, and a resume restarts both at the
exact sample order position (seeded per-epoch permutations; no batch is replayed to get there).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from pillsnap.config import PillSnapConfig
from pillsnap.data.yolo_dataset import YoloDataset
from pillsnap.evaluate.detection import detection_samples, evaluate_detector, map_detector
from pillsnap.train.policy import Policy
from pillsnap.train.schedule import warmup_cosine
from pillsnap.train.steps import apply_optimizer_update

CLOSE_MOSAIC_EPOCHS = 10  # ultralytics' recipe: the last detector epochs see un-mosaicked images


class EpochOrder(torch.utils.data.Sampler):
    """A seeded permutation per epoch, optionally from a start position (resume); yields plain indices."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start


class Stream:
    """Endless batches from a loader whose sampler has set_epoch(epoch, start_sample)."""

    def __init__(self, loader: DataLoader, sampler, batch_size: int, steps_per_epoch: int,
                 on_new_epoch: Optional[Callable[[int], None]] = None):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.steps_per_epoch, self.on_new_epoch = max(1, steps_per_epoch), on_new_epoch
        self.epoch, self.pos, self.consumed = 0, 0, 0
        self._it: Optional[Iterator] = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                if self.pos == 0 and self.on_new_epoch is not None:
                    self.on_new_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch, self.pos * self.batch_size)
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is None and self.pos == 0 and self.consumed == 0:
                raise ValueError("an interleaved data stream is empty")
            if batch is not None:
                self.pos += 1
                self.consumed += 1
            if batch is None or self.pos >= self.steps_per_epoch:
                self.epoch, self.pos, self._it = self.epoch + 1, 0, None
            if batch is not None:
                return batch

    @property
    def epochs_seen(self) -> float:
        return self.consumed / self.steps_per_epoch

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "consumed": self.consumed}

    def restore(self, state: Dict[str, int]) -> None:
        self.epoch, self.pos, self.consumed, self._it = state["epoch"], state["pos"], state["consumed"], None


def batches_per_epoch(n: int, batch_size: int, drop_last: bool, cap: Optional[int]) -> int:
    batches = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
    return max(1, min(batches, cap) if cap else batches)


def detector_param_groups(model: nn.Module, weight_decay: float):
    """Decay conv/linear weights only: biases and normalisation parameters are not regularised."""
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if name == "bias" or isinstance(module, norms) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DetectorSide:
    def __init__(self, cfg: PillSnapConfig, model: nn.Module, data: YoloDataset, val_rows, policy: Policy):
        from ultralytics.cfg import get_cfg
        from ultralytics.data import build_yolo_dataset
        from ultralytics.utils import DEFAULT_CFG

        tc = cfg.train
        self.cfg, self.policy, self.accum = cfg, policy, max(1, tc.grad_accum_steps)
        self.hyp = get_cfg(DEFAULT_CFG, {"imgsz": cfg.detection.image_size, "batch": tc.detection.batch_size})
        self.model = model.to(policy.device)
        self.model.args = self.hyp  # the detection loss reads its box/cls/dfl gains here
        self.criterion = self.model.init_criterion()
        self.dataset = build_yolo_dataset(self.hyp, data.train_list, tc.detection.batch_size,
                                          data.ultralytics_data(), mode="train", stride=32)
        self.sampler = EpochOrder(len(self.dataset), tc.seed)
        self.epochs = tc.detection.epochs
        per_epoch = batches_per_epoch(len(self.dataset), tc.detection.batch_size, False, tc.max_steps_per_epoch)
        self.stream = Stream(self._loader(), self.sampler, tc.detection.batch_size, per_epoch,
                             self._maybe_close_mosaic)
        self.optimizer = torch.optim.AdamW(detector_param_groups(self.model, tc.weight_decay), lr=tc.detection.lr)
        self.scheduler = None
        self.scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.use_scaler)
        self.val_samples = detection_samples(val_rows)
        self.micro = 0

    def plan(self, total_micro_steps: int) -> None:
        """The schedule spans this side's share of the interleaved steps."""
        tc = self.cfg.train
        self.scheduler = warmup_cosine(self.optimizer, math.ceil(total_micro_steps / self.accum), tc.warmup_steps,
                                       tc.scheduler)

    def _loader(self) -> DataLoader:
        dl, workers = self.cfg.dataloader, self.cfg.dataloader.num_workers
        return DataLoader(self.dataset, batch_size=self.cfg.train.detection.batch_size, sampler=self.sampler,
                          num_workers=workers, collate_fn=self.dataset.collate_fn,
                          pin_memory=dl.pin_memory and self.policy.device.type == "cuda",
                          persistent_workers=bool(workers) and dl.persistent_workers)

    def _maybe_close_mosaic(self, epoch: int) -> None:
        if epoch >= self.epochs - CLOSE_MOSAIC_EPOCHS and getattr(self.dataset, "mosaic", False):
            self.dataset.close_mosaic(self.hyp)
            self.stream.loader = self._loader()  # persistent workers hold their own copy of the dataset

    def step(self) -> Dict[str, float]:
        batch = self.stream.next()
        dev = self.policy.device
        batch = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["img"] = batch["img"].float() / 255
        self.model.train()
        with torch.autocast(dev.type, dtype=self.policy.amp_dtype or torch.float32,
                            enabled=self.policy.amp_dtype is not None):
            loss, items = self.criterion(self.model(batch["img"]), batch)
        loss = loss.sum() / batch["img"].shape[0]  # per image, as ultralytics reports it
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detector: non-finite loss {loss.item()} at detector epoch {self.stream.epoch}")
        self.scaler.scale(loss / self.accum).backward()
        self.micro += 1
        if self.micro % self.accum == 0:
            self._optimizer_step()
        return {k: float(v) for k, v in items.items()}

    def _optimizer_step(self) -> None:
        apply_optimizer_update(self.model, self.optimizer, self.scaler, self.cfg.train.grad_clip,
                               self.cfg.train.zero_grad_set_to_none)
        self.scheduler.step()

    def validate(self) -> Dict[str, Any]:
        detector = map_detector(self.model, self.cfg.detection.image_size, self.cfg.train.detection.batch_size)
        try:
            return evaluate_detector(detector, self.val_samples, self.cfg.detection.conf_threshold)
        finally:
            self.model.train()

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "stream": self.stream.state(), "micro": self.micro}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.restore(state["stream"])
        self.micro = state["micro"]
        if self.stream.epoch >= self.epochs - CLOSE_MOSAIC_EPOCHS:
            self._maybe_close_mosaic(self.stream.epoch)


class ClassifierSide:
    """The classifier trainer driven one micro-batch at a time: its own model, AdamW, schedule, scaler and EMA.

    ClassifierTrainer's `_forward_backward` / `_optimizer_step` are its one-micro-step / one-optimizer-step
    units (kept for this purpose); they are called here rather than duplicated, so both strategies train the
    classifier identically. Its OOM recovery (`train_step`) is not used here: an OOM stops the run, and the
    retry resumes from the newest recovery checkpoint. Auto-batch / worker tuning run only in its own `run()`.
    """

    def __init__(self, cfg: PillSnapConfig, subset, labels, out_dir):
        from pillsnap.data.datasets import make_loader
        from pillsnap.train.loop import ClassifierTrainer

        tc = cfg.train
        self.trainer = t = ClassifierTrainer(cfg, subset, labels, out_dir, show_progress=False)
        self.cfg, self.accum = cfg, t.accum
        loader = make_loader(t.train_ds, t.batch_size, cfg.dataloader, True, t.sampler)
        drop_last = cfg.dataloader.drop_last and len(t.train_ds) >= t.batch_size
        per_epoch = batches_per_epoch(len(t.train_ds), t.batch_size, drop_last, tc.max_steps_per_epoch)
        self.stream = Stream(loader, t.sampler, t.batch_size, per_epoch)
        self.micro = 0

    def plan(self, total_micro_steps: int) -> None:
        """Replace the trainer's schedule (sized for sequential epochs) with one spanning its interleaved steps."""
        from pillsnap.train.sample_schedule import sample_based_cosine

        tc, t = self.cfg.train, self.trainer
        t.scheduler = sample_based_cosine(t.optimizer, math.ceil(total_micro_steps / self.accum), tc.warmup_steps,
                                          tc.scheduler, t.batch_size * self.accum)

    def step(self) -> float:
        t = self.trainer
        batch, empty = self.stream.next(), 0
        while batch is None:  # every sample of the batch was unreadable (safe_collate dropped them)
            empty += 1
            if empty > 2 * self.stream.steps_per_epoch:
                raise RuntimeError("classifier: no readable training batch in two epochs")
            batch = self.stream.next()
        t.train_model.train()
        loss = t._forward_backward(batch)
        self.micro += 1
        if self.micro % self.accum == 0:
            t._optimizer_step()
            t.state.global_step += 1
        return loss

    def validate(self) -> Dict[str, Any]:
        t = self.trainer
        return t.validate(t.ema.module if t.ema is not None else t.model)

    def state_dict(self) -> Dict[str, Any]:
        t = self.trainer
        return {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(),
                "ema": t.ema.module.state_dict() if t.ema is not None else None, "stream": self.stream.state(),
                "micro": self.micro, "global_step": t.state.global_step, "backbone": t.cfg.classification.backbone,
                "num_classes": len(t.labels), "class_map_hash": t.labels.hash}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        t = self.trainer
        t.load_training_states(state)
        self.stream.restore(state["stream"])
        self.micro, t.state.global_step = state["micro"], state["global_step"]

    def checkpoint_payload(self, epoch: int, best_metric: Optional[float], best_epoch: int, history) -> Dict:
        """The classifier's own checkpoint schema (stage_dir/checkpoints/*.pt), as its sequential loop writes it."""
        t = self.trainer
        t.state.epoch, t.state.best_metric, t.state.best_epoch, t.state.history = epoch, best_metric, best_epoch, \
            list(history)
        return t._payload()
