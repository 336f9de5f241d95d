"""The shipped stage table on a manifest with the real release's proportions (no image files): 2.47M training
photos over 4,523 classes (216-2,592 per class), ~16K combination photos, 15 % val. Stage 1 and 2 validation sets
reach their gates, and all four subsets build in under 30 s on one core."""
import json
import time

import numpy as np
import pandas as pd
import pytest

from pillsnap.config import load_config
from pillsnap.data.subsets import build_stage_subset

pytestmark = pytest.mark.slow
CLASSES, PHOTOS, COMBINATIONS, VAL = 4523, 2_470_000, 16_000, 0.15


@pytest.fixture(scope="module")
def release_manifest():
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(np.log(420), 0.75, CLASSES), 216, 2592)  # min 216, max 2592, skewed like AIHub
    sizes = np.round(sizes * PHOTOS / sizes.sum()).astype(int)
    codes = np.array([f"K-{i:06d}" for i in range(1, CLASSES + 1)])
    k_code = np.repeat(codes, sizes)
    n = len(k_code)
    position = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    image_id = pd.Series(k_code).str.cat(pd.Series(position).astype(str), sep="_")
    split = np.where(rng.random(n) < VAL, "val", "train")
    singles = pd.DataFrame({"image_id": image_id, "image_path": "/data/" + image_id + ".png", "split": split,
                            "kind": "single", "k_code": k_code, "boxes": "[]", "width": 976, "height": 1280})
    pills = [rng.choice(codes, size=4, replace=False) for _ in range(COMBINATIONS // 4)]  # all classes, 4 a folder
    combo_ids = [f"K-{'-'.join(c[2:] for c in p)}_{j}" for p in pills for j in range(4)]
    boxes = [json.dumps([{"k_code": c, "bbox": [0, 0, 1, 1]} for c in p]) for p in pills for _ in range(4)]
    combos = pd.DataFrame({"image_id": combo_ids, "image_path": "/data/c.png", "kind": "combination", "k_code": "",
                           "boxes": boxes, "width": 976, "height": 1280,
                           "split": np.where(rng.random(len(combo_ids)) < VAL, "val", "train")})
    return pd.concat([singles, combos], ignore_index=True)


def test_the_shipped_stages_reach_their_validation_gates_in_seconds(release_manifest):
    cfg = load_config()
    started = time.process_time()  # one core's CPU time, whatever else runs on the machine
    summaries = {stage: build_stage_subset(release_manifest, stage, cfg.stage(stage), cfg.data.seed,
                                           val_fraction=cfg.data.val_fraction)[1] for stage in (1, 2, 3, 4)}
    elapsed = time.process_time() - started
    assert elapsed < 30, f"{elapsed:.1f}s"
    for stage, s in summaries.items():
        assert s.val_single >= cfg.stage(stage).min_eval_samples, (stage, s.val_single)
    assert summaries[1].val_single >= 2000 and summaries[2].val_single >= 5000
    assert summaries[1].train_single == 5000 and summaries[1].classes == 50
    assert summaries[4].classes == CLASSES and summaries[4].train_single >= 500_000
    combos = (release_manifest.kind == "combination").sum()
    for s in summaries.values():  # every stage gives the detector every combination photo
        assert s.train_combination + s.val_combination == combos
    assert summaries[1].combinations_in_scope < 10 and summaries[4].combinations_in_scope == combos
