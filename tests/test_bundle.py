"""Bundle packaging: manifest, checksums, deterministic zip, atomic commit, no overwrite."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from fxbundle.bundle import StagedBundle, bundle_paths, check_destination, verify_bundle, write_deterministic_zip
from fxbundle.errors import BundleError, UsageError


def _fill(staged: StagedBundle) -> None:
    staged.path("MQL5/Experts/FxBundle/USDJPY_1.0.0/model.onnx").write_bytes(b"\x08\x08model")
    staged.path("onnx_metadata.json").write_text("{}\n", encoding="utf-8")


def test_commit_writes_manifest_and_sums(tmp_path):
    paths = bundle_paths(tmp_path, "USDJPY", "1.0.0")
    staged = StagedBundle(paths)
    _fill(staged)
    manifest = staged.commit({"bundle": paths.name})

    assert paths.directory.is_dir()
    assert paths.zip_path.is_file()
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert set(listed) == {"MQL5/Experts/FxBundle/USDJPY_1.0.0/model.onnx", "onnx_metadata.json"}
    model = listed["MQL5/Experts/FxBundle/USDJPY_1.0.0/model.onnx"]
    assert model["size"] == 7
    assert model["sha256"] == hashlib.sha256(b"\x08\x08model").hexdigest()
    sums = (paths.directory / "SHA256SUMS").read_text().splitlines()
    assert any(line.endswith("  manifest.json") for line in sums)
    assert verify_bundle(paths.directory) == []
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


def test_verify_detects_changed_and_extra_files(tmp_path):
    paths = bundle_paths(tmp_path, "USDJPY", "1.0.0")
    staged = StagedBundle(paths)
    _fill(staged)
    staged.commit({})
    (paths.directory / "onnx_metadata.json").write_text('{"changed": true}\n')
    (paths.directory / "extra.txt").write_text("x")
    problems = verify_bundle(paths.directory)
    assert "onnx_metadata.json: content differs from the manifest" in problems
    assert "extra.txt: not in the manifest" in problems


def test_zip_is_deterministic(tmp_path):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.txt").write_text("z")
    (root / "a.txt").write_text("a")
    write_deterministic_zip(root, "top", tmp_path / "one.zip")
    (root / "a.txt").touch()  # a new modification time must not change the archive
    write_deterministic_zip(root, "top", tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "one.zip") as archive:
        assert archive.namelist() == ["top/a.txt", "top/b/z.txt"]


def test_existing_version_rejected(tmp_path):
    paths = bundle_paths(tmp_path, "USDJPY", "1.0.0")
    paths.directory.mkdir()
    with pytest.raises(BundleError) as raised:
        check_destination(paths)
    assert raised.value.key == "bundle.exists"
    assert str(paths.directory) in str(raised.value)


def test_existing_zip_rejected(tmp_path):
    paths = bundle_paths(tmp_path, "USDJPY", "1.0.0")
    paths.zip_path.write_bytes(b"old")
    with pytest.raises(BundleError) as raised:
        check_destination(paths)
    assert str(paths.zip_path) in str(raised.value)
    assert paths.zip_path.read_bytes() == b"old"


def test_version_created_meanwhile_not_overwritten(tmp_path):
    paths = bundle_paths(tmp_path, "USDJPY", "1.0.0")
    staged = StagedBundle(paths)
    _fill(staged)
    paths.directory.mkdir()
    (paths.directory / "theirs.txt").write_text("keep")
    with pytest.raises(BundleError):
        staged.commit({})
    assert (paths.directory / "theirs.txt").read_text() == "keep"
    assert not paths.zip_path.exists()


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    paths = bundle_paths(blocker / "dist", "USDJPY", "1.0.0")
    with pytest.raises(BundleError) as raised:
        check_destination(paths)
    assert raised.value.key == "bundle.not_writable"


def test_bad_version_string(tmp_path):
    with pytest.raises(UsageError):
        bundle_paths(tmp_path, "USDJPY", "1.0")


def test_manifest_lists_every_file_but_itself(tmp_path):
    paths = bundle_paths(tmp_path, "USDJPY", "2.0.0")
    staged = StagedBundle(paths)
    _fill(staged)
    staged.commit({"bundle_version": "2.0.0"})
    manifest = json.loads((paths.directory / "manifest.json").read_text())
    assert manifest["bundle_version"] == "2.0.0"
    assert "manifest.json" not in {entry["path"] for entry in manifest["files"]}
