"""The AIHub import in shards: label files parsed a few thousand at a time, each shard's result on disk.

A shard is named by the hash of its label files' paths, sizes and modification times: an edited label makes a new
shard, a finished one is not parsed again. The parts are merged in label-file order, so the manifest is the one a
single process builds (`import_aihub_split`).
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.data.aihub import ImportIssue, LabelPart, label_files, parse_labels
from pillsnap.data.shards import ShardError


@dataclass(frozen=True)
class LabelShard:
    index: int
    paths: Tuple[str, ...]
    key: str

    def describe(self) -> str:
        return f"label shard {self.index} ({len(self.paths)} files from {self.paths[0]})"


def plan_label_shards(split_root: Path, shard_size: int) -> List[LabelShard]:
    paths = label_files(split_root)
    shards = []
    for index, first in enumerate(range(0, len(paths), shard_size)):
        part = tuple(paths[first:first + shard_size])
        h = hashlib.sha1()
        for path in part:
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        shards.append(LabelShard(index, part, "labels-" + h.hexdigest()[:20]))
    return shards


def label_result(shard: LabelShard, results_dir: Path) -> Path:
    return Path(results_dir) / f"{shard.key}.json"


def run_label_shard(shard: LabelShard, results_dir: Path) -> Dict:
    """Parse a shard's label files (unless its result is on disk); returns where its result is."""
    path = label_result(shard, results_dir)
    computed = not path.is_file()
    if computed:
        try:
            part = parse_labels(shard.paths)
        except RuntimeError as e:  # parse_labels names the file
            raise ShardError(f"{shard.describe()}: {e}") from e
        # last: a result on disk means the shard finished
        write_json_atomic(path, {"records": part.records, "issues": [asdict(i) for i in part.issues],
                                 "info": part.info, "worker": f"{socket.gethostname()}:{os.getpid()}"})
    return {"shard": shard.index, "result": str(path), "labels": len(shard.paths), "computed": computed}


def read_label_parts(summaries: Sequence[Dict]) -> List[LabelPart]:
    """The shards' parts in label-file order."""
    parts = []
    for s in sorted(summaries, key=lambda s: s["shard"]):
        done = read_json(s["result"])
        parts.append(LabelPart(done["records"], [ImportIssue(**i) for i in done["issues"]], done["info"]))
    return parts
