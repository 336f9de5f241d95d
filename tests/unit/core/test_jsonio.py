"""JSON files: atomic (a failed write keeps the old file and leaves no temp file), NaN-safe, numpy-safe."""
import json
import math

import numpy as np
import pytest

from pillsnap.core import jsonio


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    jsonio.write_json_atomic(path, {"acc": 0.1})
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(jsonio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        jsonio.write_json_atomic(path, {"acc": 0.2})
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_nan_becomes_null_and_numpy_becomes_plain_json(tmp_path):
    path = jsonio.write_json_atomic(tmp_path / "x.json", {"nan": math.nan, "f": np.float32(0.5), "a": np.arange(2)})
    assert json.loads(path.read_text()) == {"nan": None, "f": 0.5, "a": [0, 1]}
    assert jsonio.read_json(path)["a"] == [0, 1]
