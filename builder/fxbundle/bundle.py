"""Bundle layout, manifest, checksums and a deterministic zip, written atomically.

The bundle is assembled in a hidden staging directory beside its final place and renamed
into place only when complete, so an interrupted or failed build leaves nothing under the
final name. An existing bundle or zip of the same pair and version is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fxbundle.hashing import sha256_file
from fxbundle.errors import BundleError, UsageError

VERSION_PATTERN = re.compile(r"^\d+\.\d+\.\d+$")
# Zip entries carry this timestamp (the earliest a zip can store) so that equal content
# always gives byte-identical archives.
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class BundlePaths:
    name: str
    directory: Path
    zip_path: Path
    expert_dir: str  # relative to the bundle root, forward slashes
    include_dir: str


def bundle_paths(out_dir: Path, pair: str, version: str) -> BundlePaths:
    if not VERSION_PATTERN.match(version):
        raise UsageError("bundle.bad_version", version=version)
    name = f"fxbundle-{pair}-{version}"
    return BundlePaths(
        name=name,
        directory=out_dir / name,
        zip_path=out_dir / f"{name}.zip",
        expert_dir=f"MQL5/Experts/FxBundle/{pair}_{version}",
        include_dir="MQL5/Include/FxBundle",
    )


def check_destination(paths: BundlePaths) -> None:
    """Fail early when the version exists or the output directory cannot be written."""
    for existing in (paths.directory, paths.zip_path):
        if existing.exists():
            raise BundleError("bundle.exists", path=str(existing))
    out_dir = paths.directory.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".fxbundle-write-test-"):
            pass
    except OSError as error:
        raise BundleError("bundle.not_writable", path=str(out_dir), detail=error.strerror or str(error)) from error



def list_files(root: Path) -> list[str]:
    """Return every file under root as a sorted list of forward-slash relative paths."""
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def file_table(root: Path, exclude: set[str]) -> list[dict]:
    return [
        {"path": relative, "size": (root / relative).stat().st_size, "sha256": sha256_file(root / relative)}
        for relative in list_files(root)
        if relative not in exclude
    ]


def write_manifest(root: Path, header: dict) -> dict:
    """Write manifest.json (every other file with size and SHA-256) and SHA256SUMS (every file)."""
    manifest = {**header, "files": file_table(root, exclude={"manifest.json", "SHA256SUMS"})}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [f"{sha256_file(root / relative)}  {relative}" for relative in list_files(root) if relative != "SHA256SUMS"]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def write_deterministic_zip(root: Path, top_folder: str, zip_path: Path) -> None:
    """Zip root under ``top_folder/`` with sorted entries, fixed timestamps and permissions."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for relative in list_files(root):
            info = zipfile.ZipInfo(f"{top_folder}/{relative}", date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100644 & 0xFFFF) << 16
            info.create_system = 3  # Unix, so the permission bits above are honoured
            archive.writestr(info, (root / relative).read_bytes(), compresslevel=9)


def verify_bundle(root: Path) -> list[str]:
    """Return every file whose size or SHA-256 differs from manifest.json, or that is missing or unlisted."""
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    problems = []
    listed = set()
    for entry in manifest["files"]:
        listed.add(entry["path"])
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: content differs from the manifest")
    for relative in list_files(root):
        if relative not in listed and relative not in {"manifest.json", "SHA256SUMS"}:
            problems.append(f"{relative}: not in the manifest")
    return problems


class StagedBundle:
    """A staging directory that becomes the bundle (and its zip) on :meth:`commit`."""

    def __init__(self, paths: BundlePaths) -> None:
        self.paths = paths
        self.staging = Path(tempfile.mkdtemp(prefix=f".{paths.name}.", suffix=".staging", dir=paths.directory.parent))

    def path(self, relative: str) -> Path:
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, manifest_header: dict, before_seal: Callable[[], None] | None = None) -> dict:
        """Write manifest, checksums and zip, then move both into place.

        ``before_seal`` runs first; the build uses it to close its log file, which must not
        change after its checksum is taken.
        """
        if before_seal is not None:
            before_seal()
        manifest = write_manifest(self.staging, manifest_header)
        partial_zip = self.staging.parent / f".{self.paths.zip_path.name}.partial"
        write_deterministic_zip(self.staging, self.paths.name, partial_zip)

        # Checked again at the end: another build may have finished this version meanwhile.
        for existing in (self.paths.directory, self.paths.zip_path):
            if existing.exists():
                partial_zip.unlink(missing_ok=True)
                raise BundleError("bundle.exists", path=str(existing))
        # mkdtemp creates the staging directory as 0700; a bundle is meant to be shared.
        os.chmod(self.staging, 0o755)
        os.replace(self.staging, self.paths.directory)
        os.replace(partial_zip, self.paths.zip_path)
        return manifest

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        (self.staging.parent / f".{self.paths.zip_path.name}.partial").unlink(missing_ok=True)
