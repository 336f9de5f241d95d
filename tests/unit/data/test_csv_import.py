"""The plain manifest CSV: singles, combinations (several rows per image), sealed test rows, clear errors."""
import json

import pytest
from PIL import Image

from pillsnap.data.csv_import import CsvManifestError, import_csv


def _images(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), (i * 50, 10, 10)).save(p)
        paths.append(p)
    return paths


def test_singles_combinations_and_sealed_test_rows(tmp_path):
    a, b, c = _images(tmp_path)
    csv = tmp_path / "m.csv"
    csv.write_text("image_path,k_code,bbox,split\n"
                   f"{a.name},K-000001,\"1,2,10,10\",train\n"
                   f"{b},K-000002,\"0,0,5,5\",\n"
                   f"{b},K-000003,\"20,10,8,8\",\n"
                   f"{c},K-000004,,test\n")
    result = import_csv(csv, show_progress=False)
    m = result.manifest.set_index("image_id")
    assert list(m.index) == ["img0", "img1"]  # the test row stays sealed
    assert m.loc["img0", "kind"] == "single" and m.loc["img0", "k_code"] == "K-000001"
    assert (m.loc["img0", "width"], m.loc["img0", "height"]) == (40, 30) and m.loc["img0", "split"] == "train"
    boxes = json.loads(m.loc["img1", "boxes"])
    assert m.loc["img1", "kind"] == "combination" and [b["k_code"] for b in boxes] == ["K-000002", "K-000003"]
    assert boxes[1]["bbox"] == [20.0, 10.0, 8.0, 8.0]
    with_test = import_csv(csv, include_test=True, show_progress=False).manifest
    assert "test" in set(with_test["split"])


def test_errors_name_the_file_line_and_value(tmp_path):
    (a,) = _images(tmp_path, 1)
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("path,code\nx,y\n")
    with pytest.raises(CsvManifestError, match=r"cols\.csv: missing column\(s\) \['image_path', 'k_code'\]"):
        import_csv(bad_cols)
    bad_box = tmp_path / "box.csv"
    bad_box.write_text(f"image_path,k_code,bbox\n{a},K-000001,\"1,2,3\"\n")
    with pytest.raises(CsvManifestError, match=r"box\.csv:2: bbox has 3 values"):
        import_csv(bad_box)
    bad_split = tmp_path / "split.csv"
    bad_split.write_text(f"image_path,k_code,split\n{a},K-000001,holdout\n")
    with pytest.raises(CsvManifestError, match="holdout"):
        import_csv(bad_split)
    missing = tmp_path / "missing.csv"
    missing.write_text("image_path,k_code\nnope.png,K-000001\n")
    result = import_csv(missing, show_progress=False)
    assert result.manifest.empty and result.issues[0].kind == "missing_image"
