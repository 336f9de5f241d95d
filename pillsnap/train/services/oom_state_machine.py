"""D-8 / Annex 6: the OOM recovery state machine, OOM detection and fault injection.

The state machine is pure: `OomRecovery.decide(error)` turns the current `OomState` into an `OomDecision`
(and the next state). Applying a decision (switch autocast to fp16, split the batch into micro-batches,
rescale LR / weight decay, save a checkpoint and exit) is the training loop's job.

Order of escalation, as the spec fixes it:
  S1 amp_fp16             once, if train.oom.escalate_to_fp16 (skipped when already fp16): same batch, schedules.
  S2 microbatching        batch halves, accumulation grows, global batch G unchanged: same schedules.
  S3 global_batch_change  only when G cannot be kept: lr *= G_new/G_old (linear scaling rule), weight decay
                          unchanged, schedule by samples. Decoupled decay (AdamW) removes lr*wd per step and an
                          epoch has G_old/G_new times as many steps, so the per-epoch decay is already the same;
                          the spec's wd *= G_old/G_new would double it at every halving (README: departures).
  emergency_exit          retries > max_retries, or batch already at min_batch with accumulation at its cap.
Every non-exit decision replays the failed batch. `retries` counts OOMs over the whole run (never reset):
each decision lowers memory for good, so a run that keeps hitting OOM must stop.

Each training unit owns its OomRecovery: the state is the ONE record of the unit's micro-batch, accumulation and
autocast dtype, which the unit reads. The loop applies decisions through `guarded_step.StepGuard` (one optimizer step
of a unit, replayed after each OOM).
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

AMP_FP16 = "amp_fp16"
MICROBATCHING = "microbatching"
GLOBAL_BATCH_CHANGE = "global_batch_change"
EMERGENCY_EXIT = "emergency_exit"



# --------------------------------------------------------------------------- error classification

# Substrings (lower-cased) that mean "an allocation failed"; retrying with less memory can help.
_OOM_MARKERS = (
    "out of memory",  # "CUDA out of memory", "CUDA error: out of memory", HIP / MPS / XPU back ends
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "defaultcpuallocator: can't allocate memory",
)
# cuDNN reports some allocation failures as a bare INTERNAL_ERROR; it also uses that code for real bugs.
# It counts as OOM only when the same message talks about memory/allocation.
_CUDNN_INTERNAL = "cudnn_status_internal_error"
_ALLOCATION_WORDS = ("memory", "alloc", "workspace")
# Errors that leave the CUDA context unusable: retrying cannot work and may corrupt results.
_FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert triggered",
    "misaligned address",
    "unspecified launch failure",
)


def _exception_chain(exc: BaseException, depth: int = 5) -> List[BaseException]:
    """The exception and its causes: libraries (ultralytics, timm wrappers) sometimes re-raise OOM wrapped."""
    chain: List[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and len(chain) < depth and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """True for errors that poison the CUDA context (illegal memory access, device asserts): never retry."""
    return any(marker in str(e).lower() for e in _exception_chain(exc) for marker in _FATAL_MARKERS)


def _message_is_oom(message: str) -> bool:
    text = message.lower()
    if any(marker in text for marker in _OOM_MARKERS):
        return True
    return _CUDNN_INTERNAL in text and any(word in text for word in _ALLOCATION_WORDS)


def is_oom_error(exc: BaseException) -> bool:
    """True when `exc` (or an exception it wraps) is an allocation failure that less memory could fix.

    Recognised: torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError); RuntimeError messages with
    "CUDA out of memory" / "out of memory", CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED, the CPU
    allocator's "DefaultCPUAllocator: can't allocate memory"; CUDNN_STATUS_INTERNAL_ERROR only when its
    message also mentions memory / alloc / workspace. Fatal CUDA errors (see is_fatal_cuda_error) are never OOM.
    """
    if is_fatal_cuda_error(exc):
        return False
    for e in _exception_chain(exc):
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and _message_is_oom(str(e)):
            return True
    return False


# --------------------------------------------------------------------------- state machine

@dataclass
class OomState:
    """The knobs OOM recovery may change; checkpoint dataclasses.asdict(state) so a resumed run keeps them."""

    batch_size: int
    grad_accum: int
    amp_dtype: str  # "bf16" | "fp16" | "fp32"
    did_amp_escalate: bool = False
    retries: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class OomPolicy:
    max_retries: int
    max_grad_accum: int
    min_batch: int
    cooldown_sec: float
    escalate_to_fp16: bool

    @classmethod
    def from_config(cls, oom_cfg: Any) -> "OomPolicy":
        """From cfg.train.oom (OomConfig)."""
        policy = cls(
            max_retries=int(oom_cfg.max_retries),
            max_grad_accum=int(oom_cfg.max_grad_accum),
            min_batch=int(oom_cfg.min_batch),
            cooldown_sec=float(oom_cfg.cooldown_sec),
            escalate_to_fp16=bool(oom_cfg.escalate_to_fp16),
        )
        if policy.min_batch < 1 or policy.max_grad_accum < 1 or policy.max_retries < 0 or policy.cooldown_sec < 0:
            raise ValueError(f"train.oom: invalid guard rails {policy} (need min_batch>=1, max_grad_accum>=1, "
                             "max_retries>=0, cooldown_sec>=0)")
        return policy


@dataclass
class OomDecision:
    """The next state and what it means. Every decision but the exit replays the failed window (its samples are
    never dropped); only GLOBAL_BATCH_CHANGE changes the schedules (lr_scale, counted by samples from then on);
    EMERGENCY_EXIT saves emergency.pt and stops."""
    action: str  # AMP_FP16 | MICROBATCHING | GLOBAL_BATCH_CHANGE | EMERGENCY_EXIT
    state: OomState  # the state to continue with (for EMERGENCY_EXIT: the state that failed)
    lr_scale: float = 1.0
    audit: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_exit(self) -> bool:
        return self.action == EMERGENCY_EXIT

    def tb_scalars(self) -> Dict[str, float]:
        """TensorBoard tags the loop writes after each OOM (D-8: oom/retries)."""
        return {
            "oom/retries": float(self.state.retries),
            "oom/batch_size": float(self.state.batch_size),
            "oom/grad_accum": float(self.state.grad_accum),
            "oom/global_batch": float(self.state.global_batch),
            "oom/lr_scale": float(self.lr_scale),
        }


class OomRecoveryExhausted(RuntimeError):
    """Raised on EMERGENCY_EXIT; carries the decision."""

    def __init__(self, decision: OomDecision):
        self.decision = decision
        super().__init__(
            f"OOM recovery exhausted after {decision.state.retries} retries "
            f"({decision.audit.get('reason', 'no further step')}); last state: batch_size="
            f"{decision.state.batch_size}, grad_accum={decision.state.grad_accum}, amp={decision.state.amp_dtype}"
        )


class OomRecovery:
    """Holds the current OomState and decides the next one after each OOM (D-8, Annex 6)."""

    def __init__(self, policy: OomPolicy, state: OomState, sleep: Callable[[float], None] = time.sleep):
        self.policy = policy
        self.state = state
        self._sleep = sleep  # injectable so tests do not wait cooldown_sec

    def decide(self, error: str = "") -> OomDecision:
        """Next step after an OOM described by `error`; updates self.state and logs the transition."""
        decision = self._next_decision(error)
        self.state = decision.state
        _log_decision(decision)
        return decision

    def _next_decision(self, error: str) -> OomDecision:
        p, old = self.policy, self.state
        retries = old.retries + 1
        base_audit = {"retries": retries, "error": error[:500], "from": _knobs(old), "G_old": old.global_batch}
        if retries > p.max_retries:
            return _exit(replace(old, retries=retries), base_audit, f"max_retries={p.max_retries} exceeded")

        self._sleep(p.cooldown_sec)

        # S1: fp16 once. Already running fp16 means there is nothing to escalate; spending a retry on it
        # would only delay the steps that do free memory.
        if p.escalate_to_fp16 and not old.did_amp_escalate and old.amp_dtype != "fp16":
            new = replace(old, amp_dtype="fp16", did_amp_escalate=True, retries=retries)
            return OomDecision(AMP_FP16, new, audit={**base_audit, "to": _knobs(new), "G_new": new.global_batch})

        g_old = old.global_batch
        bs_new = max(old.batch_size // 2, p.min_batch)
        if bs_new >= old.batch_size:  # at min_batch: smaller micro-batches are impossible
            return _exit(replace(old, retries=retries), base_audit,
                         f"batch_size={old.batch_size} is at min_batch={p.min_batch} and cannot shrink")
        accum_new = min(math.ceil(g_old / bs_new), p.max_grad_accum)
        g_new = bs_new * accum_new
        new = replace(old, batch_size=bs_new, grad_accum=accum_new, retries=retries)
        audit = {**base_audit, "to": _knobs(new), "G_new": g_new}

        # S2: micro-batching keeps the global batch, so LR, weight decay, EMA and the schedule stay valid.
        if old.grad_accum < p.max_grad_accum and g_new == g_old:
            return OomDecision(MICROBATCHING, new, audit=audit)

        # S3: the global batch must change; keep training consistent per sample seen.
        lr_scale = g_new / g_old  # linear scaling rule; wd stays: lr*wd per step x steps per epoch is unchanged
        audit.update(lr_scale=lr_scale)
        return OomDecision(GLOBAL_BATCH_CHANGE, new, lr_scale=lr_scale, audit=audit)


def _knobs(state: OomState) -> Dict[str, Any]:
    return {"batch_size": state.batch_size, "grad_accum": state.grad_accum, "amp_dtype": state.amp_dtype}


def _exit(state: OomState, audit: Dict[str, Any], reason: str) -> OomDecision:
    return OomDecision(EMERGENCY_EXIT, state, audit={**audit, "reason": reason})


def _log_decision(d: OomDecision) -> None:
    s, a = d.state, d.audit
    if d.action == AMP_FP16:
        logger.warning("OOM recovery S1 (retry %d): escalating autocast to fp16 (schedules preserved)", s.retries)
    elif d.action == MICROBATCHING:
        logger.warning("OOM recovery S2 (retry %d): micro-batching bs=%d accum=%d (global batch preserved: %d)",
                       s.retries, s.batch_size, s.grad_accum, a["G_old"])
    elif d.action == GLOBAL_BATCH_CHANGE:
        logger.warning("OOM recovery S3 (retry %d): global batch %d -> %d (bs=%d accum=%d), lr_scale=%.4f, "
                       "weight decay kept, scheduling by samples", s.retries, a["G_old"], a["G_new"], s.batch_size,
                       s.grad_accum, d.lr_scale)
    else:
        logger.error("OOM recovery: emergency exit after %d retries (%s); save a checkpoint and stop",
                     s.retries, a.get("reason"))


def release_cached_memory() -> None:
    """Free what the failed step left behind; the CUDA parts only where CUDA exists. CUDA graphs recorded by
    torch.compile(mode="reduce-overhead") keep their own memory pool, which empty_cache cannot return: the graph
    trees are reset first, and the next step records them again at the new batch size."""
    gc.collect()
    if torch.cuda.is_available():
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- fault injection

class FaultInjector:
    """Raises a synthetic OOM once at each listed global step (to exercise recovery without a real OOM)."""

    def __init__(self, steps: Iterable[int] = ()):
        self._pending = set(int(s) for s in steps)
        self.fired: List[int] = []

    @classmethod
    def from_steps(cls, steps: Sequence[int] = ()) -> "FaultInjector":
        """From train.oom.inject_at_steps (the CLI / task boundary turns PILLSNAP_INJECT_OOM into that key)."""
        if steps:
            logger.warning("OOM fault injection armed at global steps %s", sorted(set(int(s) for s in steps)))
        return cls(steps)

    @property
    def pending(self) -> List[int]:
        return sorted(self._pending)

    def maybe_raise(self, global_step: int) -> None:
        if global_step in self._pending:
            self._pending.discard(global_step)  # once: the replayed step must succeed
            self.fired.append(global_step)
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected by FaultInjector at global step {global_step})")
