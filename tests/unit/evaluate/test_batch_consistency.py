"""multi_batch_processing's measurement: top-1 flips between batch-N and batch-1, over every photo."""
import numpy as np

from pillsnap.config import load_config
from pillsnap.evaluate.batch_consistency import top1_flips
from pillsnap.evaluate.checks.registry import FAIL, PASS, StageEvidence, run_checks

RNG = np.random.default_rng(0)
BASE = RNG.normal(size=(64, 10)).astype(np.float32)
FLIPPED = set(range(0, 64, 6))  # 11 photos


def batch_dependent_engine(inputs: np.ndarray) -> np.ndarray:
    """Logits of the photo ids in inputs[:, 0]; in a batch, the top-2 of 11 photos swap (a broken batched kernel)."""
    ids = inputs[:, 0].astype(int)
    out = BASE[ids].copy()
    if len(ids) > 1:
        for row, i in enumerate(ids):
            if i in FLIPPED:
                a, b = np.argsort(-out[row])[:2]
                out[row, [a, b]] = out[row, [b, a]]
    return out


def _check(measured):
    ev = StageEvidence(stage=3, evaluation={"multi_batch": measured})
    return run_checks(load_config(), ev)["multi_batch_processing"]


def test_an_engine_that_flips_in_batches_fails():
    inputs = np.arange(64, dtype=np.float32)[:, None]
    measured = top1_flips(batch_dependent_engine, inputs, 32)
    assert measured["flips"] == 11 and measured["photos"] == 64
    result = _check(measured)
    assert result.status == FAIL and result.measured["flips_allowed"] == 1  # 0.02 x 64, fixed in advance


def test_a_consistent_engine_passes_and_rounding_within_the_tolerance_too():
    inputs = np.arange(64, dtype=np.float32)[:, None]
    consistent = top1_flips(lambda x: BASE[x[:, 0].astype(int)], inputs, 32)
    assert consistent["flips"] == 0 and _check(consistent).status == PASS
    assert _check({**consistent, "flips": 1}).status == PASS  # one fp32 tie in 64 is within 2 %
    assert _check({**consistent, "flips": 2}).status == FAIL
