"""Stage subsets: nested classes and images, per-class stratified split, honest summaries."""
import pandas as pd
import pytest

from pillsnap.config import StageSpec
from pillsnap.data.manifest import assign_splits, from_rows, image_k_codes
from pillsnap.data.subsets import build_stage_subset


def _manifest(n_classes=20, per_class=20):
    rows = [{"image_id": f"K-{c:06d}_{i}", "image_path": f"/x/{c}_{i}.png", "split": "", "kind": "single",
             "k_code": f"K-{c:06d}", "boxes": "[]", "width": 10, "height": 10}
            for c in range(n_classes) for i in range(per_class)]
    rows += [{"image_id": f"K-{a:06d}-{a + 1:06d}_{i}", "image_path": f"/x/c{a}_{i}.png", "split": "",
              "kind": "combination", "k_code": "",
              "boxes": f'[{{"k_code": "K-{a:06d}", "bbox": [0,0,1,1]}}, {{"k_code": "K-{a + 1:06d}", "bbox": [2,2,1,1]}}]',
              "width": 10, "height": 10} for a in range(0, n_classes - 1, 2) for i in range(2)]
    return assign_splits(from_rows(rows), 0.2, 0)


def test_stages_are_nested_in_classes_and_images():
    m = _manifest()
    s1, sum1 = build_stage_subset(m, 1, StageSpec(classes=5, images=40, min_eval_samples=10), seed=7)
    s2, sum2 = build_stage_subset(m, 2, StageSpec(classes=10, images=120, min_eval_samples=20), seed=7)
    s4, sum4 = build_stage_subset(m, 4, StageSpec(classes=None, images=None, min_eval_samples=0), seed=7)
    assert set(sum1.k_codes) < set(sum2.k_codes) < set(sum4.k_codes) and sum4.classes == 20
    assert set(s1.image_id) <= set(s2.image_id) <= set(s4.image_id)
    assert sum1.classes == 5 and sum1.train_single == 40 and sum1.val_single >= 10


def test_validation_is_stratified_and_sized_for_the_gate():
    m = _manifest()  # 16 train + 4 val photos per class
    sub, summary = build_stage_subset(m, 1, StageSpec(classes=8, images=8 * 8, min_eval_samples=24), seed=1)
    val = sub[(sub.kind == "single") & (sub.split == "val")]
    assert summary.val_single == len(val) == 24 and val.groupby("k_code").size().eq(3).all()
    assert summary.val_per_class == 3 and summary.train_single == 64
    assert (sub.set_index("image_id")["split"] == m.set_index("image_id").loc[sub.image_id, "split"]).all()
    _, short = build_stage_subset(m, 1, StageSpec(classes=8, images=64, min_eval_samples=100), seed=1)
    assert short.val_single == 32 and any("fewer than min_eval_samples=100" in n for n in short.notes)


def test_every_combination_photo_is_kept_for_the_detector():
    m = _manifest()
    sub, summary = build_stage_subset(m, 1, StageSpec(classes=6, images=60), seed=3)
    combos = sub[sub.kind == "combination"]
    assert len(combos) == (m.kind == "combination").sum()  # whatever their K-codes
    chosen = set(summary.k_codes)
    assert summary.combinations_in_scope == sum(set(c) <= chosen for c in image_k_codes(combos))
    assert summary.combinations_in_scope < len(combos)
    assert summary.train_combination + summary.val_combination == len(combos)


def test_deterministic_by_seed_and_honest_when_short():
    m = _manifest()
    a, _ = build_stage_subset(m, 1, StageSpec(classes=5, images=50), seed=11)
    b, _ = build_stage_subset(m, 1, StageSpec(classes=5, images=50), seed=11)
    c, _ = build_stage_subset(m, 1, StageSpec(classes=5, images=50), seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert set(a.image_id) != set(c.image_id)
    _, summary = build_stage_subset(m, 3, StageSpec(classes=1000, images=100000), seed=1)
    assert summary.classes == 20 and summary.classes_requested == 1000
    assert any("only 20" in n for n in summary.notes)


def test_test_rows_and_quarantine():
    m = _manifest()
    with_test = m.copy()
    with_test.loc[0, "split"] = "test"
    with pytest.raises(ValueError, match="test"):
        build_stage_subset(with_test, 1, StageSpec(classes=5, images=50), seed=1)
    sub, _ = build_stage_subset(m, 4, StageSpec(), seed=1, quarantine=[m.image_id.iloc[0]])
    assert m.image_id.iloc[0] not in set(sub.image_id)


def test_all_photos_of_classes_without_val_photos_say_so():
    m = _manifest()
    m = m[~((m.kind == "single") & (m.split == "val"))]
    _, summary = build_stage_subset(m, 4, StageSpec(classes=None, images=None, min_eval_samples=10), seed=3)
    assert summary.val_single == 0 and summary.train_single == 20 * 16
    assert any("fewer than min_eval_samples=10" in n for n in summary.notes)


def test_a_subset_is_keyed_by_its_stage_row_seed_split_and_validation_rules():
    from pillsnap.config import config_fingerprint, load_config, to_dict
    from pillsnap.data.prepare import subset_keys

    def key(stage, *overrides):
        return config_fingerprint(to_dict(load_config(profile="ci", overrides=list(overrides))), subset_keys(stage))

    assert key(1, "train.classification.lr=0.5", "serve.port=9") == key(1)
    assert key(1, "data.stages.2.images=7") == key(1) != key(2, "data.stages.2.images=7")
    for changed in ("data.stages.1.images=7", "data.seed=3", "data.val_fraction=0.3",
                    "data.validation.min_images_per_class=5"):
        assert key(1, changed) != key(1), changed
