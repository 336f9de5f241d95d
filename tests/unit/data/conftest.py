import json
import shutil

import pytest

from pillsnap.data.aihub import import_aihub
from pillsnap.data.manifest import assign_splits


@pytest.fixture(scope="session")
def tiny_manifest(tiny_aihub):
    """The tiny synthetic set imported and split (val_fraction 0.2, seed 0)."""
    return assign_splits(import_aihub(tiny_aihub, show_progress=False).manifest, 0.2, 0)


@pytest.fixture(scope="session")
def broken(tiny_aihub, tmp_path_factory):
    """(manifest, import issues, ids) of a copy of the tiny set with one real bad file of every kind."""
    root = tmp_path_factory.mktemp("broken") / "aihub"
    shutil.copytree(tiny_aihub / "train", root / "train")
    singles = sorted((root / "train/images/single").rglob("*.png"))
    labels = {p.stem: p for p in (root / "train/labels/single").rglob("*.json")}
    bad = {}
    data = singles[0].read_bytes()
    singles[0].write_bytes(data[: len(data) // 2]); bad["truncated"] = singles[0].stem
    singles[1].write_bytes(b""); bad["empty"] = singles[1].stem
    singles[2].write_text("this is not a png"); bad["text"] = singles[2].stem
    labels[singles[3].stem].write_text('{"images": [{"file_name": '); bad["malformed"] = singles[3].stem
    singles[4].unlink(); bad["no_image"] = singles[4].stem
    labels[singles[5].stem].unlink(); bad["no_json"] = singles[5].stem
    label = json.loads(labels[singles[6].stem].read_text())
    label["annotations"][0]["bbox"] = [label["images"][0]["width"] - 5, 0, 50, 20]
    labels[singles[6].stem].write_text(json.dumps(label)); bad["bbox"] = singles[6].stem
    result = import_aihub(root, show_progress=False)
    m = assign_splits(result.manifest, 0.2, 0)
    # a class present only in val
    in_combos = {b["k_code"] for boxes in m.loc[m.kind == "combination", "boxes"] for b in json.loads(boxes)}
    val_only = sorted(set(m.loc[m.kind == "single", "k_code"]) - in_combos)[-1]
    m.loc[m.k_code == val_only, "split"] = "val"
    # the same picture in train and in val
    broken_ids = set(bad.values())
    train_img = m[(m.split == "train") & (m.kind == "single") & ~m.image_id.isin(broken_ids)].iloc[0]
    val_row = m[(m.split == "val") & (m.kind == "single") & (m.k_code != val_only) & ~m.image_id.isin(broken_ids)].iloc[0]
    shutil.copyfile(train_img.image_path, val_row.image_path)
    bad.update(val_only=val_only, dup_train=train_img.image_id, dup_val=val_row.image_id)
    return m, result.issues, bad
