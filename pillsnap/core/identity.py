"""Content identity of the experiment's artifacts: what a file IS, not where it lies.

A verdict, a cached result or a resume is bound to the content it judged: the sha256 of a checkpoint or an export,
the hash of a subset's rows, a photo's size and modification time. A recorded identity that differs from what is
on disk now is a miss (the step runs again) or an ArtifactChanged error naming both, never a silent reuse.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]
CHUNK = 1 << 20


class ArtifactChanged(RuntimeError):
    """A file is not the content that was recorded for it (replaced, retrained, truncated); names both hashes."""


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes (hex); streamed, so an 80 MB checkpoint costs ~0.1 s and little memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_or_none(path: Optional[PathLike]) -> Optional[str]:
    return file_sha256(path) if path and Path(path).is_file() else None


def file_stamp(path: PathLike) -> str:
    """Size and modification time (ns): what a photo's cached result is keyed by, without reading its bytes. A
    rewritten file (truncated, replaced, restored from a backup) gets a new stamp; a missing one says so."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def short(digest: Optional[str]) -> str:
    return digest[:12] if digest else "none"


def verify_file(path: PathLike, expected: Optional[str], what: str) -> str:
    """The file's sha256, which must be `expected` (raises ArtifactChanged naming both, or the missing file)."""
    if not expected:
        raise ArtifactChanged(f"{what}: {path} has no recorded sha256 to check it against")
    if not Path(path).is_file():
        raise ArtifactChanged(f"{what}: {path} is gone (recorded sha256 {short(expected)})")
    actual = file_sha256(path)
    if actual != expected:
        raise ArtifactChanged(f"{what}: {path} is not the recorded file: sha256 {short(actual)} on disk, "
                              f"{short(expected)} recorded")
    return actual
