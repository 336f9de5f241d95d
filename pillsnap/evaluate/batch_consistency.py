"""multi_batch_processing: photos classified in batches must get the top-1 they get one at a time.

Both passes use the serving preprocessing and the same engine; only the batch size differs. A photo whose two best
logits lie closer than the two passes' largest logit difference is a near tie: its top-1 may flip on rounding
alone, so it is counted apart and not as a disagreement.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from pillsnap.infer.engines import ClassifierEngine
from pillsnap.infer.preprocess import classifier_inputs, load_rgb


def batch_consistency(engine: ClassifierEngine, photos: Sequence[str], image_size: int,
                      batch_size: int) -> Dict[str, object]:
    inputs = np.concatenate([classifier_inputs(load_rgb(p), [None], image_size, 0.0) for p in photos])
    one_by_one = np.concatenate([engine.logits(inputs[i:i + 1]) for i in range(len(inputs))])
    batched = np.concatenate([engine.logits(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    diff = float(np.abs(batched - one_by_one).max())
    top2 = np.sort(one_by_one, axis=1)[:, -2:] if one_by_one.shape[1] > 1 else np.zeros((len(inputs), 2))
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * diff
    agree = one_by_one.argmax(1) == batched.argmax(1)
    decided = ~near_tie
    return {"photos": len(photos), "batch_size": min(batch_size, len(photos)), "max_logit_diff": diff,
            "near_ties": int(near_tie.sum()), "disagreements": int((~agree & decided).sum()),
            "top1_agreement": float(agree[decided].mean()) if decided.any() else None}
