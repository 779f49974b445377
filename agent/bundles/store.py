"""Content-addressed model store.

Layout under ``root``: ``objects/ab/<sha256>`` (verified files, named by their hash, read-only),
``partial/<sha256>`` (downloads in progress, resumable), ``versions/<name>/<version>/<path>``
(hard links into objects, so runtimes see the bundle's own file names — ONNX external data and
OpenVINO xml+bin need them — and the verified copy is the copy that is loaded).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.fsutil import fsync_dir


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self.versions = self.root / "versions"
        for d in (self.objects, self.partial, self.versions):
            d.mkdir(parents=True, exist_ok=True)

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def has(self, sha256: str, size: int) -> bool:
        p = self.object_path(sha256)
        try:
            return p.stat().st_size == size
        except FileNotFoundError:
            return False

    def partial_path(self, sha256: str) -> Path:
        return self.partial / sha256

    def commit_partial(self, sha256: str) -> Path:
        """Move a verified download into objects/ (atomic, durable)."""
        src = self.partial_path(sha256)
        dst = self.object_path(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o444)
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return dst

    def version_dir(self, name: str, version: int) -> Path:
        return self.versions / name / str(version)

    def link_version(self, name: str, version: int, files: dict[str, str]) -> Path:
        """Lay out ``versions/<name>/<version>/`` with hard links to the objects (path → sha)."""
        vdir = self.version_dir(name, version)
        tmp = vdir.with_name(f".{version}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        for rel, sha in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.object_path(sha), target)
        if vdir.exists():
            shutil.rmtree(vdir)
        os.replace(tmp, vdir)
        fsync_dir(vdir.parent)
        return vdir

    def remove_version(self, name: str, version: int) -> None:
        shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    def collect(self, referenced: set[str]) -> int:
        """Delete objects no kept version references; returns bytes freed."""
        freed = 0
        for p in self.objects.glob("*/*"):
            if p.name not in referenced:
                freed += p.stat().st_size
                p.unlink()
        return freed

    def sweep(self, referenced: set[str], kept: set[tuple[str, int]]) -> int:
        """Remove everything not referenced: objects, partial downloads, version folders and
        half-made ones left by a crash. Call only when no deploy is running."""
        freed = self.collect(referenced)
        for p in self.partial.iterdir():
            freed += p.stat().st_size
            p.unlink()
        for model_dir in self.versions.iterdir():
            for vdir in model_dir.iterdir():
                if not (vdir.name.isdigit() and (model_dir.name, int(vdir.name)) in kept):
                    shutil.rmtree(vdir, ignore_errors=True)
            if not any(model_dir.iterdir()):
                model_dir.rmdir()
        return freed

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.objects.glob("*/*"))
