"""The local control API (agentctl) handlers."""

# mypy: disable-error-code="misc"
# (the methods here annotate ``self: Agent``: the class they are mixed into, not a supertype of this one)

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.serving.control import ControlServer

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("agent.daemon")

LOCAL_OP_TIMEOUT_S = 120.0  # an agentctl rollback/remove/config waits this long for the ops worker
BENCH_OP_TIMEOUT_S = 280.0  # agentctl bench: under the control client's 300 s; the handler bounds each run
LOCAL_BENCH_MAX = 4  # agentctl bench calls running or waiting on their own worker; more are "busy"
LOCAL_JOB_KEEP_S = 7 * 86400  # local jobs are kept (for `agentctl jobs`) like fleet jobs


class ControlApi:
    """Methods of `Agent` (agent/daemon/__init__.py): the local control API (agentctl) handlers."""

    # -- local API ---------------------------------------------------------------------------
    def _control_handlers(self: Agent, control: ControlServer) -> None:
        """Register every agentctl call on the control socket (read calls, then mutating ones)."""
        control.register("status", lambda _: self.full_status())
        control.register("models", self._local_models)
        control.register("jobs", lambda p: self.db.jobs(int(p.get("limit", 20))))
        control.register("explain", self._local_explain)
        control.register("infer", self._local_infer)
        control.register("hw", self._local_hw)
        control.register("bench", lambda p: self._local_bench({
            k: v for k, v in p.items() if k in ("model", "iterations", "backends")}))
        set_config = self._local_op("config")
        control.register("config", lambda p: set_config(p) if p.get("set") else self.cfg.to_dict(),
                         mutating=lambda p: bool(p.get("set")))
        control.register("rollback", self._local_op("rollback"), mutating=True)
        control.register("remove", self._local_op("remove"), mutating=True)
        control.register("install", self._local_install, mutating=True, streaming=True)

    def _local_models(self: Agent, _: dict[str, Any]) -> Any:
        out = []
        for m in self.models_status():
            m["kept"] = self.db.versions(m["name"])
            sv = self.registry.get(m["name"])
            if sv is not None:
                m["io"] = sv.describe()
                m["worker_pid"] = sv.worker.pid if sv.worker is not None else None
            out.append(m)
        return out

    def _local_infer(self: Agent, p: dict[str, Any]) -> Any:
        from agent import tensors

        name = p.get("model")
        if not isinstance(name, str):
            raise errors.RejectError(errors.INVALID_INPUT, "infer needs a model name")
        raw = p.get("inputs") or {}
        if not isinstance(raw, dict):
            raise errors.RejectError(errors.INVALID_INPUT, "inputs must be an object of tensors")
        inputs = {k: tensors.decode(v, k) for k, v in raw.items()}
        t0 = time.perf_counter()
        sv, out = self.registry.infer(name, inputs)
        return {"model": name, "version": sv.version, "backend": sv.backend,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                "outputs": {k: tensors.encode(v) for k, v in out.items()}}

    def _local_explain(self: Agent, p: dict[str, Any]) -> Any:
        job = self.db.job(str(p.get("job", "")))
        if job is None:
            raise errors.RejectError(errors.UNKNOWN_JOB, f"no job {p.get('job')!r} on this device")
        job["timeline"] = self.db.job_timeline(job["id"])
        return job

    def _local_hw(self: Agent, _: dict[str, Any]) -> Any:
        from agent.backends.selection import merge_live_targets
        from agent.hardware import hw_report

        return hw_report("/", self.cfg.hardware.profiles_dirs, self.cfg.hardware.profile, reconcile=merge_live_targets)

    def _local_op(self: Agent, type_: str) -> Callable[[dict[str, Any]], Any]:
        """A mutating call from agentctl: a local job (visible in `jobs`, reported to the fleet),
        run on the ops worker so it is ordered with the fleet's rollback/remove/bench."""
        handler = self.handlers[type_]

        def run(p: dict[str, Any]) -> Any:
            params = {k: v for k, v in p.items() if k in ("model", "to_version", "set")}
            job_id = f"local-{type_}-{uuid.uuid4().hex[:12]}"
            model = params.get("model") if isinstance(params.get("model"), str) else None
            self.db.create_job(job_id, type_, model, params, time.time() + LOCAL_JOB_KEEP_S, state="IN_PROGRESS")
            self.reporter.update(job_id, type_, "IN_PROGRESS", persist=False, extra={"origin": "agentctl"})
            try:
                result = self._ops.submit(handler, params).result(LOCAL_OP_TIMEOUT_S)
            except errors.AgentError as e:
                self.reporter.update(job_id, type_, "REJECTED" if isinstance(e, errors.RejectError) else "FAILED", error=e)
                raise
            except FutureTimeout as e:
                err = errors.AgentError(errors.TIMEOUT, f"{type_} did not finish within {LOCAL_OP_TIMEOUT_S:g} s")
                self.reporter.update(job_id, type_, "TIMED_OUT", error=err)
                raise err from e
            self.reporter.update(job_id, type_, "SUCCEEDED", result=result)
            return result if type_ == "config" else {"job": job_id, **result}
        return run

    def _local_install(self: Agent, p: dict[str, Any], emit: Any) -> Any:
        """``agentctl install``: a client of the deploy queue (agent/deploy/offline.py)."""
        from agent.deploy.offline import install_op  # and the archive reader: at first use

        return install_op(self.deploys, self.db, p, emit)

    def _local_bench(self: Agent, params: dict[str, Any]) -> Any:
        """``agentctl bench`` on the bench worker; refused ``busy`` past ``LOCAL_BENCH_MAX``."""
        if not self._bench_slots.acquire(blocking=False):
            raise errors.RetryableError(errors.BUSY, f"{LOCAL_BENCH_MAX} bench calls are already running or waiting; "
                                        "try again when they finish")
        try:
            fut = self._bench.submit(self.handlers["bench"], params)
        except BaseException:
            self._bench_slots.release()
            raise
        fut.add_done_callback(lambda _: self._bench_slots.release())
        try:
            return fut.result(BENCH_OP_TIMEOUT_S)
        except FutureTimeout as e:
            raise errors.AgentError(errors.TIMEOUT, f"bench did not finish within {BENCH_OP_TIMEOUT_S:g} s") from e
