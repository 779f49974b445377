"""The KServe v2 endpoints: one parsed request and its body → one response.

Endpoints (SURFACE.md, "Local inference API"): ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2``, ``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``,
``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON tensors and the binary tensor extension,
``Inference-Header-Content-Length``) and ``GET /metrics``.

Invariants:
- ``respond`` never raises: every failure is a JSON ``{"error": message, "code": stable_code}``
  reply with a status from the code; bad input is never ``internal``.
- An infer runs inside the model's admission (``Registry.admit``) from decoding to the answer,
  bound to one serving version (``Registry.infer``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from agent import errors
from agent.serving import guard
from agent.serving.admission import RETRY_AFTER_S
from agent.serving.guard import LogGate
from agent.serving.handler import Response, error_response
from agent.serving.httpconn import HttpFail, Request, status_of
from agent.serving.tensors import decode_request, encode_response, kserve_dtype, to_json

if TYPE_CHECKING:
    from agent.serving.registry import Registry, ServingVersion

__all__ = ["EXTENSIONS", "Routes", "infer_target"]

log = logging.getLogger(__name__)

EXTENSIONS = ("binary_tensor_data",)


def infer_target(target: str) -> tuple[str, str | None] | None:
    """``/v2/models/{name}[/versions/{v}]/infer`` → ``(name, v)``; None for any other path."""
    path = target.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    parts = path.split("/")
    if "%" in path:
        parts = [unquote(p) for p in parts]
    n = len(parts)
    if n == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return parts[3], None
    if (n == 7 and parts[6] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]
            and parts[4] == "versions"):
        return parts[3], parts[5]
    return None


class Routes:
    """The endpoints of one server: its registry, its identity, readiness and metrics sources."""

    def __init__(self, registry: Registry, server_name: str, server_version: str, max_body_bytes: int,
                 gate: LogGate, ready_fn: Callable[[], bool] | None = None,
                 metrics_fn: Callable[[], tuple[bytes, str]] | None = None) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.gate = gate
        self._ready_fn = ready_fn
        self._metrics_fn = metrics_fn
        self._meta_cache: dict[str, tuple[weakref.ref[ServingVersion], bytes]] = {}
        self._server_meta = to_json({"name": server_name, "version": server_version,
                                     "extensions": list(EXTENSIONS)}, exact=True)  # no orjson at start

    def respond(self, req: Request, body: bytes) -> Response:
        """One request → one response; never raises."""
        try:
            return self._route(req, body)
        except HttpFail as e:
            return error_response(e.status, e.code, e.message, e.headers)
        except errors.AgentError as e:
            retry = (("Retry-After", str(RETRY_AFTER_S)),) if e.code == errors.BUSY else ()
            return error_response(status_of(e.code), e.code, e.message, retry)
        except (RecursionError, MemoryError) as e:
            self.gate.log(log, logging.WARNING, "input", "inference API: %s %s: %s", req.method,
                          req.target[:100], type(e).__name__)
            return error_response(400, errors.INVALID_INPUT, f"request too complex to decode: {type(e).__name__}")
        except Exception as e:
            self.gate.log(log, logging.ERROR, "internal", "inference API: %s %s failed", req.method,
                          req.target[:100], exc_info=True)
            return error_response(500, errors.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _route(self, req: Request, body: bytes) -> Response:
        method = req.method
        path = req.target.split("?", 1)[0]
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        parts = path.split("/")[1:] if path.startswith("/") else [""]  # "*", absolute-form: 404
        if "%" in path:
            parts = [unquote(p) for p in parts]
        n = len(parts)
        get = method in ("GET", "HEAD")

        if parts[0] == "v2":
            if n == 1:
                self._allow(get, "GET")
                return Response(200, self._server_meta)
            if parts[1] == "health" and n == 3:
                if parts[2] == "live":
                    self._allow(get, "GET")
                    return Response(200, b'{"live":true}')
                if parts[2] == "ready":
                    self._allow(get, "GET")
                    if self._ready():
                        return Response(200, b'{"ready":true}')
                    return Response(503, b'{"ready":false}')
            if parts[1] == "models" and n >= 3 and parts[2]:
                name = parts[2]
                rest = parts[3:]
                version: str | None = None
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                if not rest:
                    self._allow(get, "GET")
                    return Response(200, self._metadata(self._serving(name, version)))
                if len(rest) == 1 and rest[0] == "ready":
                    self._allow(get, "GET")
                    sv = self._serving(name, version)
                    return Response(200, to_json({"name": sv.name, "ready": True}))
                if len(rest) == 1 and rest[0] == "infer":
                    self._allow(method == "POST", "POST")
                    with self.registry.admit(name):  # decoding and answering count in the model's bound
                        return self._infer(name, self._version(name, version), req, body)
        elif parts[0] == "metrics" and n == 1:
            self._allow(get, "GET")
            if self._metrics_fn is None:
                raise HttpFail(404, errors.NOT_FOUND, "metrics are not enabled", close=False)
            data, ctype = self._metrics_fn()
            return Response(200, data, ctype)
        raise HttpFail(404, errors.NOT_FOUND, f"no such endpoint: {path[:200]}", close=False)

    @staticmethod
    def _allow(ok: bool, allowed: str) -> None:
        if not ok:
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise HttpFail(405, errors.METHOD_NOT_ALLOWED, f"method not allowed; use {allowed}", close=False,
                           headers=(("Allow", allow),))

    def _ready(self) -> bool:
        if self._ready_fn is None:
            return True
        try:
            return bool(self._ready_fn())
        except Exception:
            log.warning("inference API: ready_fn failed", exc_info=True)
            return False

    @staticmethod
    def _version(name: str, version: str | None) -> int | None:
        if version is None:
            return None
        if not version.isdigit():
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} version {version!r} is not serving")
        return int(version)

    def _serving(self, name: str, version: str | None) -> ServingVersion:
        sv = self.registry.get(name)
        if sv is None:
            raise errors.RejectError(errors.UNKNOWN_MODEL, f"model {name!r} is not serving")
        v = self._version(name, version)
        if v is not None and v != sv.version:
            raise errors.RejectError(errors.UNKNOWN_MODEL,
                                     f"model {name!r} version {v} is not serving (serving: {sv.version})")
        return sv

    def _metadata(self, sv: ServingVersion) -> bytes:
        cached = self._meta_cache.get(sv.name)
        if cached is not None and cached[0]() is sv:
            return cached[1]

        def tensors(specs: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": kserve_dtype(t.dtype),
                     "shape": [-1 if d is None else d for d in t.shape]} for t in specs]

        data = to_json({"name": sv.name, "versions": [str(sv.version)], "platform": sv.backend,
                      "inputs": tensors(sv.model.inputs), "outputs": tensors(sv.model.outputs)})
        self._meta_cache[sv.name] = (weakref.ref(sv), data)
        return data

    def _infer(self, name: str, version: int | None, req: Request, body: bytes) -> Response:
        guard.check_infer_type(req)
        body = guard.decode_body(req, body, self.registry.body_limit(name, self.max_body_bytes))
        ir = decode_request(req.headers, body)
        sv, results = self.registry.infer(name, ir.feed, version)
        data, ctype, headers = encode_response(sv, results, ir)
        return Response(200, data, ctype, headers)
