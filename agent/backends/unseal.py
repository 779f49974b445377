"""The one seam between encrypted bundles (agent/bundles/sealed.py) and the runtimes.

A loader that finds ``options.extra[sealed.SPEC_KEY]`` decrypts the files it names into memory,
hardens the process first and hands the runtime the bytes; plain bundles pass straight through.
It lives in backends (above bundles) so that bundles never need to know what a runtime is.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from agent.backends.base import Backend, LoadedModel, LoadOptions
from agent.bundles.sealed import SPEC_KEY, Encryption, decrypt_file, harden, load_identities

log = logging.getLogger(__name__)


def load(backend: Backend, path: Path, target: str, options: LoadOptions) -> LoadedModel:
    """``backend.load``, decrypting the files ``options.extra[SPEC_KEY]`` names into memory first
    (the one seam between encrypted bundles and the runtimes; plain bundles pass straight through)."""
    spec = options.extra.get(SPEC_KEY)
    if not spec:
        return backend.load(path, target, options)
    harden()
    identities = load_identities(spec["identities"])
    contents = {p: decrypt_file(Path(p), Encryption(**e), identities) for p, e in spec["files"].items()}
    log.info("%s: %d encrypted file(s) opened in memory (%d bytes)", path.name, len(contents),
             sum(len(b) for b in contents.values()))
    # No compiled-model cache: an OpenVINO blob or a TensorRT engine holds the weights, on disk.
    extra = {k: v for k, v in options.extra.items() if k != SPEC_KEY} | {"cache_dir": ""}
    try:
        return backend.load(path, target, dataclasses.replace(options, extra=extra, contents=contents, cache_dir=None))
    finally:
        contents.clear()  # the runtime holds its own copy (TFLite: a reference) from here on
