"""YOLO-format detection data: one class, normalised boxes, linked images, built once per content hash."""
import os
import threading
import time

import numpy as np
import pytest
import yaml

from pillsnap.data.manifest import boxes_of
from pillsnap.data import yolo_dataset
from pillsnap.data.yolo_dataset import detection_rows, build_yolo_dataset, label_lines
from tests.unit.detection_support import det_data  # noqa: F401  (session fixture)


def test_labels_are_one_class_normalised_and_images_linked(det_data, tmp_path):  # noqa: F811
    ds = build_yolo_dataset(det_data.manifest, tmp_path, 1, include_single_images=False)
    assert ds.images == {"train": 24, "val": 8} and ds.rebuilt
    assert yaml.safe_load(open(ds.data_yaml)) == {"path": ds.root, "train": "train.txt", "val": "val.txt", "nc": 1,
                                                  "names": {0: "pill"}}
    listed = open(ds.val_list).read().split()
    assert len(listed) == 8 and all(os.path.isfile(p) for p in listed)
    row = det_data.rows("val").iloc[0]
    image = next(p for p in listed if os.path.basename(p).startswith(row["image_id"]))
    assert os.path.samefile(image, row["image_path"]) or os.path.realpath(image) == row["image_path"]
    label = image.replace("/images/", "/labels/").rsplit(".", 1)[0] + ".txt"
    got = np.loadtxt(label, ndmin=2)
    want = [[0, (x + w / 2) / row["width"], (y + h / 2) / row["height"], w / row["width"], h / row["height"]]
            for x, y, w, h in (b["bbox"] for b in boxes_of(row))]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert sum(len(open(p.replace("/images/", "/labels/").rsplit(".", 1)[0] + ".txt").readlines())
               for p in listed) == ds.boxes["val"] == sum(len(boxes_of(r)) for _, r in det_data.rows("val").iterrows())


def test_built_once_per_hash_and_rebuilt_when_the_data_changes(det_data, tmp_path):  # noqa: F811
    first = build_yolo_dataset(det_data.manifest, tmp_path, 1, include_single_images=False)
    stamp = os.stat(first.data_yaml).st_mtime_ns
    again = build_yolo_dataset(det_data.manifest, tmp_path, 1, include_single_images=False)
    assert not again.rebuilt and again.content_hash == first.content_hash
    assert os.stat(first.data_yaml).st_mtime_ns == stamp
    with_singles = build_yolo_dataset(det_data.manifest, tmp_path, 1, include_single_images=True)
    assert with_singles.rebuilt and with_singles.content_hash != first.content_hash
    assert with_singles.images["train"] == 24 + len(det_data.rows("train", "single"))
    assert with_singles.composition["train"] == {"combination": 24, "single": len(det_data.rows("train", "single"))}
    fewer = det_data.manifest.drop(det_data.rows("train").index[:4])
    assert build_yolo_dataset(fewer, tmp_path, 1, include_single_images=False).images["train"] == 20
    assert not list(tmp_path.glob("data/stage_1/yolo.*")), "no half-built or old folders left behind"


def test_two_builders_at_once_build_once_and_the_second_reuses(det_data, tmp_path, monkeypatch):  # noqa: F811
    """The ranks of one training each ask for the stage's dataset at the same moment: the second waits for the
    first's build and reuses it. Without the lock both built, and the second swapped its folder in while the first
    read train.txt (FileNotFoundError on a rank)."""
    write = yolo_dataset._write

    def slow_write(*args, **kwargs):
        time.sleep(1.0)  # the first builder is still writing when the second asks
        return write(*args, **kwargs)

    monkeypatch.setattr(yolo_dataset, "_write", slow_write)
    results = []
    builders = [threading.Thread(target=lambda: results.append(
        build_yolo_dataset(det_data.manifest, tmp_path, 1, include_single_images=False))) for _ in range(2)]
    for builder in builders:
        builder.start()
        time.sleep(0.2)
    for builder in builders:
        builder.join(60)
    assert sorted(r.rebuilt for r in results) == [False, True]
    assert all(os.path.isfile(p) for p in open(results[0].train_list).read().split())


def test_label_lines_clip_to_the_image_and_skip_empty_boxes():
    lines, skipped = label_lines([{"k_code": "K-1", "bbox": [-10, 0, 30, 20]},
                                  {"k_code": "K-2", "bbox": [50, 50, 0, 10]}], width=100, height=50)
    assert skipped == 1 and lines == ["0 0.100000 0.200000 0.200000 0.400000"]


def test_a_subset_without_val_photos_with_boxes_is_refused(det_data, tmp_path):  # noqa: F811
    train_only = det_data.manifest[det_data.manifest["split"] == "train"]
    with pytest.raises(ValueError, match="no val photo with a box"):
        build_yolo_dataset(train_only, tmp_path, 1)


def test_the_cap_takes_combination_photos_first_and_keeps_the_val_share(det_data, tmp_path):  # noqa: F811
    capped = build_yolo_dataset(det_data.manifest, tmp_path, 1, include_single_images=True, cap=30,
                                val_fraction=0.25)
    assert capped.composition["train"] == {"combination": 24, "single": 6} and capped.cap == 30
    assert capped.images["val"] == 10 and capped.composition["val"]["combination"] == 8
    again = detection_rows(det_data.manifest, True, 30, 0.25)
    assert set(again["image_id"]) == {os.path.basename(p).rsplit(".", 1)[0]
                                      for lst in (capped.train_list, capped.val_list) for p in open(lst).read().split()}
