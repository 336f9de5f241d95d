"""multi_batch_processing: photos classified in batches must get the top-1 they get one at a time.

Both passes use the serving preprocessing and the same engine; only the batch size differs. Every photo counts:
a top-1 that differs between the passes is a flip, whatever its margin. The check allows
`evaluation.checks.multi_batch_max_flip_rate` of the photos (fp32 rounding), a tolerance fixed in advance, so an
engine whose answer depends on the batch it is in fails however close its logits look.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np

from pillsnap.infer.engines import ClassifierEngine
from pillsnap.infer.preprocess import classifier_inputs, load_rgb


def top1_flips(logits: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int) -> Dict[str, object]:
    """Top-1 of `inputs` one at a time vs in batches of `batch_size`, over all of them."""
    one_by_one = np.concatenate([logits(inputs[i:i + 1]) for i in range(len(inputs))])
    batched = np.concatenate([logits(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    flips = int((one_by_one.argmax(1) != batched.argmax(1)).sum())
    return {"photos": len(inputs), "batch_size": min(batch_size, len(inputs)),
            "max_logit_diff": float(np.abs(batched - one_by_one).max()), "flips": flips,
            "top1_agreement": 1.0 - flips / len(inputs)}


def batch_consistency(engine: ClassifierEngine, photos: Sequence[str], image_size: int,
                      batch_size: int) -> Dict[str, object]:
    inputs = np.concatenate([classifier_inputs(load_rgb(p), [None], image_size, 0.0) for p in photos])
    return top1_flips(engine.logits, inputs, batch_size)
