"""The daemon's distribution-version lookup (agent/backends/probed.py ``dist_versions``) says what
``importlib.metadata.version`` says, for every distribution installed here and for the spellings
and layouts a device may have."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from agent.backends.probed import RUNTIME_DISTS, dist_versions


def _library(names: list[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = ""
    return out


def test_agrees_with_importlib_metadata_on_every_installed_distribution() -> None:
    names = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()} | set(RUNTIME_DISTS))
    assert len(names) > 20, "the test environment's own distributions"
    assert dist_versions(names) == _library(names)


def _dist(root: Path, folder: str, name: str, version: str) -> None:
    d = root / folder
    d.mkdir(parents=True)
    (d / ("METADATA" if folder.endswith(".dist-info") else "PKG-INFO")).write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_agrees_on_spellings_shadowing_and_egg_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _dist(first, "Fancy_Runtime-2.0.1.dist-info", "Fancy-Runtime", "2.0.1")
    _dist(second, "fancy_runtime-1.0.0.dist-info", "fancy-runtime", "1.0.0")  # shadowed by the first
    _dist(second, "old.pkg-0.9.egg-info", "old.pkg", "0.9")
    _dist(second, "dotted_name-3.1rc1.dist-info", "dotted.name", "3.1rc1")
    monkeypatch.setattr(sys, "path", [str(first), str(tmp_path / "missing"), str(second)])
    names = ["fancy-runtime", "FANCY_RUNTIME", "old-pkg", "dotted.name", "not-installed"]
    got = dist_versions(names)
    assert got == _library(names)
    assert got["fancy-runtime"] == "2.0.1" and got["not-installed"] == ""
