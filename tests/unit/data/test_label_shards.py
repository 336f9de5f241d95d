"""The AIHub import in shards gives the manifest one process gives, even when a combination photo's labels fall
in two shards; a finished shard is not parsed again, an edited label makes a new shard, a broken one names its file."""
import os
import shutil

import pytest

from pillsnap.data import aihub
from pillsnap.data.aihub import assemble_split, import_aihub, training_split
from pillsnap.data.label_shards import plan_label_shards, read_label_parts, run_label_shard
from pillsnap.data.shards import ShardError


def test_shards_give_the_manifest_of_one_process(tiny_aihub, tmp_path):
    shards = plan_label_shards(training_split(tiny_aihub), 5)
    combination_labels = [[p for p in s.paths if "combination" in p] for s in shards]
    assert len(shards) > 10 and sum(1 for c in combination_labels if c) >= 2
    summaries = [run_label_shard(s, tmp_path) for s in shards]
    sharded = assemble_split(training_split(tiny_aihub), "", read_label_parts(summaries[::-1]))  # any order
    alone = import_aihub(tiny_aihub, show_progress=False)
    assert sharded.manifest.equals(alone.manifest) and sharded.issues == alone.issues and sharded.info == alone.info
    assert (sharded.manifest.kind == "combination").sum() > 0
    assert not any(run_label_shard(s, tmp_path)["computed"] for s in shards)  # finished: not parsed again


def test_an_edited_label_makes_a_new_shard(tiny_aihub, tmp_path):
    root = tmp_path / "aihub"
    shutil.copytree(training_split(tiny_aihub), training_split(root))
    before = [s.key for s in plan_label_shards(training_split(root), 20)]
    first = plan_label_shards(training_split(root), 20)[1].paths[0]
    os.utime(first, ns=(1, 1))
    after = [s.key for s in plan_label_shards(training_split(root), 20)]
    assert after[1] != before[1] and after[:1] + after[2:] == before[:1] + before[2:]


def test_a_label_file_that_breaks_the_shard_is_named(tiny_aihub, tmp_path, monkeypatch):
    shard = plan_label_shards(training_split(tiny_aihub), 20)[2]
    victim = shard.paths[3]
    real = aihub._parse_label

    def parse(path):
        if str(path) == victim:
            raise MemoryError("cannot allocate")
        return real(path)

    monkeypatch.setattr(aihub, "_parse_label", parse)
    with pytest.raises(ShardError, match=rf"label shard 2 \(20 files from .*\): {victim}: MemoryError"):
        run_label_shard(shard, tmp_path)
    assert not list(tmp_path.glob("*.json"))  # nothing a re-run would take for finished
