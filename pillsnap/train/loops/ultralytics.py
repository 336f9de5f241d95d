"""train.strategy=sequential, detector half: ultralytics' DetectionTrainer, driven for ALL epochs in one call.

(An earlier implementation called train(epochs=1) per outer epoch and never progressed.) Callbacks forward every
batch and epoch to our telemetry (the D-10 `[train/det]` line, Annex 7 tags), progress listeners and checkpoints
in OUR schema (<stage>/detector/checkpoints/{last,best}.pt, one "improved?" rule); every fresh run gets its own
folder (runs/run001, …), and a resume continues the unfinished run with ultralytics' `resume=True`: the
remaining epochs, appended to the same results.csv. `detector/sequential_state.json` records the run, its
fingerprint (training config, batch plan, data), history, OOM state and whether it completed, so a retried task
returns a finished result instead of training again, and a re-run with other settings starts fresh.

OOM (D-8): ultralytics halves the batch itself inside the first epoch. Any OOM that reaches us is decided by the
same state machine as the other loops: the batch halves and ultralytics' accumulation keeps the nominal batch
(`nbs`), and training continues from the last epoch checkpoint (or restarts the run when none exists yet);
exhausted, the run stops with a clear error and a resumable checkpoint. S1 (fp16) is not offered here:
ultralytics fixes `amp` for a run and ignores a change on resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.data.yolo_dataset import YoloDataset, detector_facts, stage_detector_dataset
from pillsnap.models.detector import backbone_name, detector_payload, write_model_yaml
from pillsnap.progress import progress
from pillsnap.train.loops.engine import EpochHook, StepHook
from pillsnap.train.results import TrainResult, epoch_rows
from pillsnap.train.services.checkpointer import Checkpointer, improved, training_fingerprint
from pillsnap.train.services.oom import (FaultInjector, OomPolicy, OomRecovery, OomState, is_fatal_cuda_error,
                                         is_oom_error, release_cached_memory)
from pillsnap.train.services.oom_guard import OomExhaustedError
from pillsnap.train.services.policy import resolve_policy
from pillsnap.train.services.schedule import MIN_LR_FACTOR
from pillsnap.train.services.telemetry import TBWriter, Telemetry

log = logging.getLogger(__name__)
MONITOR = "mAP_0.5"
VAL_KEYS = {"metrics/mAP50(B)": "mAP_0.5", "metrics/mAP50-95(B)": "mAP_0.5_0.95",
            "metrics/precision(B)": "precision", "metrics/recall(B)": "recall"}
TRAIN_LOSSES = ("box_loss", "cls_loss", "dfl_loss")


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ------------------------------------------------------------------------------------------------ the entry point
def train_detector_sequential(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, stage_dir: Path,
                              init_checkpoint: Optional[Path] = None, plans: Optional[Dict[str, Dict]] = None,
                              step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                              show_progress: bool = True, injector: Optional[FaultInjector] = None) -> TrainResult:
    out = Path(stage_dir) / "detector"
    plans = plans or {}
    data, _ = stage_detector_dataset(cfg, subset, stage)
    model_yaml = write_model_yaml(cfg.detection, out / "model")
    fingerprint = training_fingerprint(to_dict(cfg), {"detector": plans.get("batch")}) + "-" + data.content_hash
    ckpt = Checkpointer(out / "checkpoints", json.dumps(to_dict(cfg)), fingerprint)
    state_path = out / "sequential_state.json"
    state = _load_state(state_path, fingerprint, cfg.train.resume, ckpt)
    if state.get("completed"):
        log.info("detector: %s already completed (%s); returning its result", state["run_dir"], state_path)
        return _result(cfg, state, data, out)
    injector = injector or FaultInjector.from_steps(cfg.train.oom.inject_detector_at_steps)
    if _resumable_last(state, cfg.train.detection.epochs) is not None:  # an interrupted run: continue it
        state["resumed_from_step"] = state.get("global_step", 0)
    run = _Run(cfg, data, model_yaml, out, state, state_path, ckpt, plans, init_checkpoint, injector)
    with progress(total=cfg.train.detection.epochs, desc="train detector", unit="epoch",
                  enabled=show_progress) as bar:
        bar.update(len(state["history"]))
        run.train(step_hook, epoch_hook, bar)
    return _result(cfg, run.state, data, out)


class _Run:
    """One sequential detector training with its OOM recovery: trainer.train() until done, exhausted or failed."""

    def __init__(self, cfg, data: YoloDataset, model_yaml: Path, out: Path, state: Dict[str, Any], state_path: Path,
                 ckpt: Checkpointer, plans: Dict[str, Dict], init_checkpoint: Optional[Path],
                 injector: FaultInjector):
        self.cfg, self.data, self.model_yaml, self.out = cfg, data, model_yaml, out
        self.state, self.state_path, self.ckpt, self.plans = state, state_path, ckpt, plans
        self.init_checkpoint, self.injector = init_checkpoint, injector
        tc = cfg.train
        batch = int((plans.get("batch") or {}).get("batch_size") or tc.detection.batch_size)
        # The nominal batch ultralytics keeps by accumulation: the configured global batch.
        self.nominal = tc.detection.batch_size * max(1, tc.grad_accum_steps)
        policy = OomPolicy.from_config(tc.oom)
        policy = OomPolicy(policy.max_retries, policy.max_grad_accum, policy.min_batch, policy.cooldown_sec, False)
        oom_state = OomState(**state["oom_state"]) if state.get("oom_state") else \
            OomState(batch, max(1, round(self.nominal / batch)), "fp32")
        self.recovery = OomRecovery(policy, oom_state)

    def train(self, step_hook, epoch_hook, bar) -> None:
        while True:
            error = None
            try:
                self._train_once(step_hook, epoch_hook, bar)
                break
            except Exception as exc:  # noqa: BLE001 - filtered right below
                if is_fatal_cuda_error(exc) or not is_oom_error(exc):
                    raise
                error = f"{type(exc).__name__}: {exc}"
            release_cached_memory()  # outside the except block: the failed step's tensors can go now
            self._recover(error)
        self.state["completed"] = True
        self.state["stopped_early"] = len(self.state["history"]) < self.cfg.train.detection.epochs
        write_json_atomic(self.state_path, self.state)

    def _train_once(self, step_hook, epoch_hook, bar) -> None:
        from pillsnap.train.loops.ultralytics_trainer import PillDetectionTrainer

        cfg, state = self.cfg, self.state
        overrides = _overrides(cfg, self.data, self.model_yaml, self.out / "runs", self.recovery.state.batch_size,
                               self.nominal, self.plans.get("workers"))
        resume_from = _resumable_last(state, cfg.train.detection.epochs)
        if resume_from is not None:
            overrides["resume"] = str(resume_from)
            log.info("detector: resuming %s at epoch %d of %d (batch %d)", resume_from, len(state["history"]) + 1,
                     cfg.train.detection.epochs, overrides["batch"])
        else:
            overrides["name"] = _next_run_name(self.out / "runs")
            state.update(run_dir=str(self.out / "runs" / overrides["name"]), completed=False, history=[],
                         global_step=0)
        trainer = PillDetectionTrainer(overrides, self.data.ultralytics_data(), cfg.detection, self.init_checkpoint)
        forwarder = EpochForwarder(cfg, trainer, state, self.state_path, self.out, self.ckpt, step_hook, epoch_hook,
                                   bar, self.injector)
        with forwarder.attached(), _no_amp_download_check(overrides["amp"] is True):
            trainer.train()

    def _recover(self, error: str) -> None:
        decision = self.recovery.decide(error)
        events: List[Dict[str, Any]] = self.state.setdefault("oom_events", [])
        st = decision.state
        event = {"model": "detector", "action": decision.action, "epoch": len(self.state["history"]) + 1,
                 "global_step": self.state.get("global_step", 0), "batch_size": st.batch_size,
                 "accumulate": max(1, round(self.nominal / st.batch_size)), "nominal_batch": self.nominal,
                 "retries": st.retries, "error": error[:200]}
        events.append(event)
        self.state["oom_state"] = {**st.__dict__}
        write_json_atomic(self.state_path, self.state)
        if decision.is_exit:
            last = _resumable_last(self.state, self.cfg.train.detection.epochs) or self.out / "checkpoints" / "last.pt"
            raise OomExhaustedError(decision, Path(last), "train.detection")
        log.warning("detector OOM recovery (%s): continuing at batch %d (ultralytics accumulates %d to keep the "
                    "nominal batch %d) from %s", decision.action, st.batch_size, event["accumulate"], self.nominal,
                    _resumable_last(self.state, self.cfg.train.detection.epochs) or "a new run")


def _overrides(cfg: PillSnapConfig, data: YoloDataset, model_yaml: Path, runs: Path, batch: int, nominal: int,
               workers: Optional[Dict]) -> Dict[str, Any]:
    """The resolved config, translated into ultralytics' arguments (and nothing else decides them)."""
    tc, det = cfg.train, cfg.detection
    policy = resolve_policy(cfg.optimization)
    batches_per_epoch = max(1, math.ceil(data.images["train"] / batch))
    patience = tc.early_stopping.patience if tc.early_stopping.enabled else tc.detection.epochs + 1
    # ultralytics' trainer runs amp and compile on CUDA only (it forces amp off on a CPU); say the same here.
    cuda = policy.device.type == "cuda"
    amp: Any = False
    if policy.amp_dtype is not None and cuda:
        amp = "bf16" if "bfloat16" in str(policy.amp_dtype) else True
    return {
        "task": "detect", "mode": "train", "model": str(model_yaml), "data": data.data_yaml,
        "epochs": tc.detection.epochs, "batch": batch, "imgsz": det.image_size, "nbs": nominal,
        "optimizer": "AdamW", "lr0": tc.detection.lr, "lrf": MIN_LR_FACTOR, "weight_decay": tc.weight_decay,
        "cos_lr": tc.scheduler == "cosine", "warmup_epochs": tc.warmup_steps / batches_per_epoch,
        "warmup_bias_lr": 0.0, "patience": patience, "seed": tc.seed, "deterministic": tc.deterministic,
        "device": str(policy.device.index or 0) if cuda else "cpu", "amp": amp,
        "workers": int(workers["num_workers"]) if workers else cfg.dataloader.num_workers,
        "channels_last": policy.channels_last,
        "compile": policy.compile_mode if cuda and policy.compile_mode != "none" else False,
        "project": str(runs), "exist_ok": False, "plots": False, "val": True, "save": True, "verbose": False,
        "pretrained": False, "max_det": det.max_det,
    }


def _load_state(path: Path, fingerprint: str, resume: str, ckpt: Checkpointer) -> Dict[str, Any]:
    if resume != "last" or not path.is_file():
        return {"history": []}
    state = read_json(path)
    if state.get("signature") != fingerprint:
        ckpt.archive(f"{path} belongs to another training configuration, batch plan or data set",
                     [path.parent / "runs", path])
        return {"history": []}
    for record in state.get("history", []):  # JSON keeps "not measured" as null; comparisons want NaN
        for part in ("train", "val"):
            record[part] = {k: float("nan") if v is None else v for k, v in record[part].items()}
    return state


def _resumable_last(state: Dict[str, Any], epochs: int) -> Optional[Path]:
    """The unfinished run's last.pt, when it holds at least one finished epoch and epochs remain."""
    if not state.get("run_dir") or state.get("completed"):
        return None
    last = Path(state["run_dir"]) / "weights" / "last.pt"
    done = len(state.get("history", []))
    if last.is_file() and 0 < done < epochs:
        return last
    return None


def _next_run_name(runs: Path) -> str:
    taken = {p.name for p in runs.glob("run*")} if runs.is_dir() else set()
    k = 1
    while f"run{k:03d}" in taken:
        k += 1
    return f"run{k:03d}"


@contextlib.contextmanager
def _no_amp_download_check(fp16: bool) -> Iterator[None]:
    """Ultralytics checks fp16 AMP by downloading a model; the precision policy already decided, so it is skipped."""
    if not fp16:
        yield
        return
    import ultralytics.engine.trainer as engine

    original = engine.check_amp
    engine.check_amp = lambda model: True
    try:
        yield
    finally:
        engine.check_amp = original


def _result(cfg: PillSnapConfig, state: Dict[str, Any], data: YoloDataset, out: Path) -> TrainResult:
    history = state.get("history", [])
    best = None
    for record in history:  # the epoch our rule kept as best.pt (ties: the later one, as ultralytics)
        if best is None or improved(record["val"].get(MONITOR), best["val"].get(MONITOR)):
            best = record
    best_val = dict(best["val"]) if best else {}
    best_metric = _num(best_val.get(MONITOR))
    oom_state = state.get("oom_state") or {}
    return TrainResult(
        model="detector", strategy="sequential", backbone=backbone_name(cfg.detection),
        best_checkpoint=str(out / "checkpoints" / "best.pt"), last_checkpoint=str(out / "checkpoints" / "last.pt"),
        monitor=MONITOR, best_metric=best_metric if math.isfinite(best_metric) else None,
        best_epoch=best["epoch"] if best else -1, epochs_completed=len(history),
        epochs_planned=cfg.train.detection.epochs, global_step=int(state.get("global_step", 0)),
        resumed_from_step=state.get("resumed_from_step"), stopped_early=bool(state.get("stopped_early")),
        val_metrics=best_val, history=history, epochs=epoch_rows(history, MONITOR),
        mean_throughput=float(state.get("mean_throughput", 0.0)),
        policy=resolve_policy(cfg.optimization).describe(),
        batch_size=int(oom_state.get("batch_size", cfg.train.detection.batch_size)),
        oom_events=list(state.get("oom_events", [])), tensorboard=str(out / "tb"), run_dir=state.get("run_dir", ""),
        not_measured=sorted(k for k, v in best_val.items() if not math.isfinite(v)) if best else [MONITOR],
        data=detector_facts(data), class_map_hash=data.content_hash)


# ------------------------------------------------------------------------------------------------ callbacks
class EpochForwarder:
    """Ultralytics callbacks -> our telemetry, progress, state file and checkpoints.

    Per epoch ultralytics runs: on_train_epoch_end -> validation -> on_model_save -> on_fit_epoch_end. The epoch is
    closed at the first of the last two (metrics are final, its last.pt is on disk); a final extra on_fit_epoch_end
    (best.pt re-validation) is recognised by "no new training epoch" and ignored. Every metric is a float; one
    that was not measured is NaN and listed in the record's `not_measured`.
    """

    def __init__(self, cfg: PillSnapConfig, trainer, state: Dict[str, Any], state_path: Path, out: Path,
                 ckpt: Checkpointer, step_hook: Optional[StepHook], epoch_hook: Optional[EpochHook], bar,
                 injector: FaultInjector):
        self.cfg, self.trainer, self.state, self.state_path, self.out = cfg, trainer, state, state_path, out
        self.ckpt, self.step_hook, self.epoch_hook, self.bar, self.injector = ckpt, step_hook, epoch_hook, bar, injector
        self.tb = TBWriter(out / "tb", cfg.logging.tensorboard)
        self.telemetry = Telemetry(self.tb, "[train/det]", cfg.train.detection.epochs, cfg.train.step_log_interval,
                                   resolve_policy(cfg.optimization).device)
        self._fresh_epoch = False
        self._pending: Optional[Dict[str, Any]] = None
        self._t_end = time.perf_counter()
        self._t_start = self._t_end

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        for event, fn in (("on_train_epoch_start", self._on_epoch_start), ("on_train_batch_start", self._on_batch_start),
                          ("on_train_batch_end", self._on_batch_end),
                          ("on_train_epoch_end", self._on_epoch_end), ("on_model_save", self._on_model_save),
                          ("on_fit_epoch_end", self._on_fit_epoch_end)):
            self.trainer.add_callback(event, fn)
        try:
            yield
        finally:
            self.state["mean_throughput"] = self.telemetry.mean_throughput
            self.tb.close()

    # ----------------------------------------------------------------- events
    def _on_epoch_start(self, trainer) -> None:
        self._t_end = time.perf_counter()  # data time starts with the epoch, not at the last validation

    def _on_batch_start(self, trainer) -> None:
        self._t_start = time.perf_counter()
        self.injector.maybe_raise(self.state["global_step"] + 1)  # a drill OOM, outside ultralytics' own handler

    def _on_batch_end(self, trainer) -> None:
        now = time.perf_counter()
        self.state["global_step"] += 1
        loss = float(sum(float(v) for v in trainer.loss_items.values()))
        step_in_epoch = self.state["global_step"] - len(self.state["history"]) * len(trainer.train_loader)
        self.telemetry.step(self.state["global_step"], trainer.epoch + 1, step_in_epoch, len(trainer.train_loader),
                            loss, trainer.optimizer.param_groups[0]["lr"], trainer.batch_size,
                            self._t_start - self._t_end, now - self._t_start)
        self._t_end = now
        if self.step_hook is not None:
            self.step_hook(self.state["global_step"], loss, "detector")

    def _on_epoch_end(self, trainer) -> None:
        self._fresh_epoch = True

    def _on_model_save(self, trainer) -> None:
        record = self._close_epoch(trainer)
        if record is not None:
            self._write_checkpoints(trainer, record)

    def _on_fit_epoch_end(self, trainer) -> None:
        self._close_epoch(trainer)
        record, self._pending = self._pending, None
        if record is None:
            return
        self._report(record)
        if self.epoch_hook is not None:
            self.epoch_hook("detector", record["epoch"], record)

    # ----------------------------------------------------------------- helpers
    def _close_epoch(self, trainer) -> Optional[Dict[str, Any]]:
        if not self._fresh_epoch:
            return None
        self._fresh_epoch = False
        record = self._record(trainer)
        expected = len(self.state["history"]) + 1
        if record["epoch"] != expected:
            log.warning("detector: ultralytics reports epoch %d, our history expected %d", record["epoch"], expected)
        self.state["history"].append(record)
        self.state["signature"] = self.ckpt.fingerprint
        write_json_atomic(self.state_path, self.state)
        reports = self.out.parent / "reports" / "metrics.json"
        doc = read_json(reports) if reports.is_file() else {}
        doc["detection"] = {"latest": record, "history": self.state["history"]}
        write_json_atomic(reports, doc)
        self._pending = record
        return record

    def _record(self, trainer) -> Dict[str, Any]:
        metrics = trainer.metrics or {}
        val = {ours: _num(metrics.get(theirs)) for theirs, ours in VAL_KEYS.items()}
        val.update({k.split("/", 1)[1]: _num(v) for k, v in metrics.items() if k.startswith("val/")})
        losses = trainer.tloss or {}
        train = {k: _num(losses.get(k)) for k in TRAIN_LOSSES}
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer else float("nan")
        not_measured = [k for k, v in {**val, **train}.items() if not math.isfinite(v)]
        return {"epoch": trainer.epoch + 1, "global_step": self.state["global_step"], "train": train, "val": val,
                "lr": float(lr), "batch_size": trainer.batch_size, "not_measured": not_measured,
                "resources": self.telemetry.end_epoch()}

    def _report(self, record: Dict[str, Any]) -> None:
        e, total = record["epoch"], self.cfg.train.detection.epochs
        t, v = record["train"], record["val"]
        log.info("[det] e=%d/%d box_loss=%s cls_loss=%s dfl_loss=%s mAP50=%s mAP50-95=%s P=%s R=%s", e, total,
                 fmt(t["box_loss"]), fmt(t["cls_loss"]), fmt(t["dfl_loss"]), fmt(v["mAP_0.5"]),
                 fmt(v["mAP_0.5_0.95"]), fmt(v["precision"]), fmt(v["recall"]))
        if record["not_measured"]:
            log.warning("[det] e=%d not measured: %s", e, ", ".join(record["not_measured"]))
        step = record["global_step"]
        self.telemetry.scalars({f"train/{k}": val if math.isfinite(val) else None for k, val in t.items()}, step)
        self.telemetry.validation({k: val if math.isfinite(val) else None for k, val in v.items()}, step)
        self.tb.flush()
        self.bar.update(1)
        self.bar.set_postfix_str(f"mAP50={fmt(v['mAP_0.5'])}")

    def _write_checkpoints(self, trainer, record: Dict[str, Any]) -> None:
        history: List[Dict[str, Any]] = self.state["history"]
        earlier = [h["val"]["mAP_0.5"] for h in history[:-1] if math.isfinite(h["val"]["mAP_0.5"])]
        best_before = max(earlier) if earlier else None
        value = record["val"]["mAP_0.5"]
        is_best = improved(value, best_before)
        payload = detector_payload(
            trainer.ema.ema, backbone_name(self.cfg.detection), self.cfg.detection.image_size, strategy="sequential",
            epoch=record["epoch"], global_step=record["global_step"], monitor=MONITOR,
            best_metric=value if is_best else best_before, val_metrics_json=json.dumps(record["val"]),
            run_dir=str(trainer.save_dir), ultralytics_checkpoint=str(trainer.last))
        self.ckpt.save("last.pt", payload)
        if is_best:
            self.ckpt.save("best.pt", payload)

