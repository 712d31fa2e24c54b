"""The store is the cache: manifests, digests, code versions, damaged artifacts."""

import json

import pytest

from nanochat_core.pipeline import artifacts
from nanochat_core.pipeline.artifacts import ArtifactError


def make_artifact(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return artifacts.write_manifest(root, "demo", {"x": 1}, {"up": "abc"}, "code1", {"m": 2.0})


def test_manifest_lists_files_and_is_written_last(tmp_path):
    root = tmp_path / "a"
    digest = make_artifact(root, {"w.bin": b"12345", "sub/t.json": b"{}", ".tmp-x": b"ignored"})
    manifest = json.loads((root / artifacts.MANIFEST).read_text())
    assert set(manifest["files"]) == {"w.bin", "sub/t.json"}
    assert manifest["files"]["w.bin"]["size"] == 5
    assert manifest["metrics"] == {"m": 2.0}
    ref = artifacts.verify_artifact(str(root), digest, deep=True)
    assert ref.digest == digest


def test_incomplete_artifact_is_not_found(tmp_path):
    (tmp_path / "demo" / "k1").mkdir(parents=True)
    (tmp_path / "demo" / "k1" / "w.bin").write_bytes(b"x")
    assert artifacts.find_artifact(str(tmp_path), "demo", "k1") is None
    with pytest.raises(ArtifactError, match="incomplete"):
        artifacts.verify_artifact(str(tmp_path / "demo" / "k1"))


def test_damaged_artifact_is_refused(tmp_path):
    root = tmp_path / "demo" / "k1"
    make_artifact(root, {"w.bin": b"12345"})
    assert artifacts.find_artifact(str(tmp_path), "demo", "k1") is not None
    (root / "w.bin").write_bytes(b"1234")  # truncated: size check catches it
    assert artifacts.find_artifact(str(tmp_path), "demo", "k1") is None
    (root / "w.bin").write_bytes(b"12X45")  # same size, flipped byte: only the deep check catches it
    assert artifacts.find_artifact(str(tmp_path), "demo", "k1") is not None
    with pytest.raises(ArtifactError, match="corrupt"):
        artifacts.verify_artifact(str(root), deep=True)
    (root / "w.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.verify_artifact(str(root))


def test_wrong_expected_digest_is_refused(tmp_path):
    root = tmp_path / "a"
    make_artifact(root, {"w.bin": b"1"})
    with pytest.raises(ArtifactError, match="differs"):
        artifacts.verify_artifact(str(root), "0" * 64)


def test_check_store_rejects_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="not writable"):
        artifacts.check_store(str(blocker / "store"))


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    target = tmp_path / "out.json"
    artifacts.atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        artifacts.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
