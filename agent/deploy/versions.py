"""Loading a version the device keeps: for a rollback, a restart, a worker re-check or a bench.

Invariants:
- A kept version loads on the backend recorded when it was installed (``runtime:target``), from
  its own folder of the store, in a worker process unless ``backends.isolation = "none"``.
- A version loaded to serve is checked against its golden samples unless the caller says it
  passed them already (at deploy: a restart, a worker re-check of the same files); a model that
  fails its check is closed here, never handed out.
- The deploy runner loads candidates through ``load_model`` too: one way into the runtimes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import errors
from agent.backends.base import Backend, LoadedModel, LoadOptions
from agent.backends.unseal import load as sealed_load
from agent.bundles.manifest import Manifest, Variant, parse_document
from agent.bundles.sealed import SPEC_KEY, load_spec
from agent.bundles.store import Store
from agent.deploy.validation import validate
from agent.serving.registry import ServingVersion

if TYPE_CHECKING:  # the runner imports this module: its settings are named, not imported, here
    from agent.deploy.runner import DeploySettings


class KeptVersions(Protocol):
    """The versions table as the loader reads it (``agent.state.StateDB`` implements it)."""

    def version(self, name: str, version: int) -> dict[str, Any] | None: ...


def sealed_spec(m: Manifest, variant: Variant, vdir: Path, settings: DeploySettings) -> dict[str, Any] | None:
    """What loading ``variant`` of an encrypted bundle decrypts (agent/bundles/sealed.py); None
    for a plain one."""
    return load_spec(m.raw, vdir, [f.path for f in variant.files], settings.decryption_keys)


def load_model(backends: Sequence[Backend], runtime: str, target: str, path: Path,
               settings: DeploySettings, precision: str = "", spares: Sequence[Any] = (),
               sealed: dict[str, Any] | None = None) -> LoadedModel:
    """Load on ``runtime:target``, in a worker process unless ``backends.isolation = "none"`` (one
    of ``spares``, started ahead for that runtime, when there is one).

    ``precision`` is the variant's: backends pick their compute precision from it explicitly.
    ``sealed`` (``sealed_spec``): the encrypted files the loading process decrypts into memory."""
    options = LoadOptions(threads=settings.threads, allow_spinning=settings.allow_spinning, precision=precision,
                          cache_dir=Path(settings.cache_dir) if settings.cache_dir else None,
                          extra={"precision": precision, "cache_dir": settings.cache_dir,  # survive the worker
                                 **({SPEC_KEY: sealed} if sealed else {})})
    if not any(b.runtime == runtime for b in backends):
        raise errors.RejectError(errors.NO_COMPATIBLE_BACKEND, f"runtime {runtime!r} is not available")
    if settings.isolation == "process":
        from agent.backends.isolated import IsolatedModel

        spare = next((sp for sp in spares if sp.runtime == runtime and sp.claim()), None)
        return IsolatedModel(runtime, target, path, options, infer_timeout_s=settings.infer_timeout_s, spare=spare)
    for b in backends:
        if b.runtime == runtime:
            return sealed_load(b, path, target, options)
    raise AssertionError("unreachable")


class VersionLoader:
    """Loads kept versions and their variants; the one seam the rollback, the restore, the
    probation supervisor and the bench use to reach the runtimes."""

    def __init__(self, versions: KeptVersions, store: Store, backends: Sequence[Backend],
                 settings: Callable[[], DeploySettings]) -> None:
        self.versions = versions
        self.store = store
        self.backends = backends
        self.settings = settings

    def version_dir(self, name: str, version: int) -> Path:
        return self.store.version_dir(name, version)

    def load_variant(self, m: Manifest, variant: Variant, vdir: Path, runtime: str, target: str) -> LoadedModel:
        """``variant`` of an installed manifest on ``runtime:target`` (no golden-sample check)."""
        s = self.settings()
        return load_model(self.backends, runtime, target, vdir / variant.main_file.path, s,
                          precision=variant.precision, sealed=sealed_spec(m, variant, vdir, s))

    def load(self, name: str, version: int, validate_samples: bool = True) -> ServingVersion:
        """Load a kept version on its recorded backend and (by default) check it against its
        golden samples; a restart or a worker restart skips the check (it passed at deploy)."""
        info = self.versions.version(name, version)
        if info is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"{name} v{version} is not installed")
        m = parse_document(info["manifest"])
        runtime, target = info["backend"].split(":", 1)
        vdir = self.version_dir(name, version)
        variant = m.variant(info["variant"])
        model = self.load_variant(m, variant, vdir, runtime, target)
        if m.validation is not None and validate_samples:
            try:
                validate(model, vdir, m, variant)
            except errors.AgentError:
                model.close()
                raise
        return ServingVersion(name, version, info["variant"], model, manifest=m.raw)
