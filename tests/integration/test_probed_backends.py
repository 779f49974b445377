"""Backend targets listed by a child process (agent/backends/probed.py): the same verdicts as the
backends give in this process, cached on disk, re-probed when the evidence changes, and the old
in-process listing when the child fails. Real backends and a real child interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.backends import available_backends
from agent.backends.probed import ProbedBackend, TargetProbe, probed_backends


def verdicts(targets: list) -> list[tuple[str, bool, str]]:
    return [(t.id, t.availability.usable, t.availability.reason) for t in targets]


def test_child_probe_matches_in_process_targets_and_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "targets.json"
    backends = available_backends()
    wrapped = probed_backends(backends, cache, warm=False)
    assert all(isinstance(b, ProbedBackend) for b in wrapped)
    for raw, probed in zip(backends, wrapped, strict=True):
        assert probed.runtime == raw.runtime
        assert verdicts(probed.targets()) == verdicts(raw.targets())
    probe = wrapped[0]._probe
    assert probe.probes == 1  # one child for every backend
    assert json.loads(cache.read_text())["key"]
    again = TargetProbe(backends, cache)  # a restart: the cache answers, no child
    assert verdicts(again.targets("onnxruntime")) == verdicts(wrapped[0].targets())
    assert again.probes == 0


def test_changed_evidence_probes_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = TargetProbe(available_backends(), tmp_path / "targets.json")
    probe.targets("onnxruntime")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # what a runtime reads changed: the verdicts may too
    probe.targets("onnxruntime")
    assert probe.probes == 2


def test_failed_child_falls_back_to_in_process_targets(tmp_path: Path) -> None:
    backends = available_backends()
    probe = TargetProbe(backends, tmp_path / "targets.json", timeout_s=0.001)  # the child cannot finish
    ort = next(b for b in backends if b.runtime == "onnxruntime")
    assert verdicts(probe.targets("onnxruntime")) == verdicts(ort.targets())
    assert not (tmp_path / "targets.json").exists()


def test_other_backends_are_left_as_they_are(tmp_path: Path) -> None:
    class Fake:
        runtime = "fake"

        def targets(self) -> list:
            return []

    fake = Fake()
    out = probed_backends([fake], tmp_path / "t.json", warm=False)
    assert out == [fake]
