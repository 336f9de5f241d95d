"""Content identity: a file's sha256 and stamp, and the error that names both hashes."""
import os

import pytest

from pillsnap.core.identity import ArtifactChanged, file_sha256, file_stamp, verify_file


def test_a_rewritten_file_has_a_new_stamp_and_hash(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"pixels")
    stamp, digest = file_stamp(path), file_sha256(path)
    assert verify_file(path, digest, "photo") == digest
    path.write_bytes(b"pixel")  # truncated
    os.utime(path, ns=(1, 1))
    assert file_stamp(path) != stamp and file_stamp(tmp_path / "gone.png") == "missing"
    with pytest.raises(ArtifactChanged, match=rf"photo: .*photo.png is not the recorded file: sha256 "
                                              rf"{file_sha256(path)[:12]} on disk, {digest[:12]} recorded"):
        verify_file(path, digest, "photo")
    with pytest.raises(ArtifactChanged, match="is gone"):
        verify_file(tmp_path / "gone.png", digest, "photo")
    with pytest.raises(ArtifactChanged, match="no recorded sha256"):
        verify_file(path, None, "photo")
