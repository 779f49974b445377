"""Inference worker process: loads one model on one backend and answers requests.

Why: a native runtime that crashes (a segfault in a delegate, an OOM kill) or hangs must not
take the daemon — and its MQTT session, its other models and its local API — down with it. The
daemon talks to the worker through ``IsolatedModel`` (agent/backends/isolated.py), which starts it
as ``main("FD,FD,…,CTL")``: the descriptors are socket pairs it inherited.

Protocol on each pipe (``Channel``: pickled records of agent/backends/wire.py after their length):
the parent first sends ``Load`` on the first pipe (a worker started ahead of its model gets
``Preload`` before it, and imports meanwhile); the worker answers ``Ready`` or ``Err``. Then the
parent sends dicts of numpy arrays (already checked against the model's inputs); the worker answers
``Ok`` (the outputs) or ``Err``; ``Golden`` runs agent/backends/golden.py here and answers its figures.
The worker exits when every pipe is closed (the daemon went away) or says ``None``. The last descriptor is the control socket on which the daemon
hands over HTTP connections (agent/serving/adopted.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import errors
from agent.backends.wire import Channel, Err, Golden, Load, Ok, Preload, Ready

if TYPE_CHECKING:
    from agent.backends.base import LoadedModel

PARENT_POLL_S = 1.0


def _die_with_parent() -> None:
    """Exit when the daemon is gone, even if it died by SIGKILL and a runtime call is stuck.

    (PR_SET_PDEATHSIG is no use here: it fires when the *thread* that started us exits, and the
    daemon starts workers from short-lived threads.)
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(conn: Channel, model: LoadedModel) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        try:
            if isinstance(msg, Golden):  # the samples load here, not in the daemon
                from agent.backends.golden import TimingPlan, run

                out: Any = run(model, Path(msg.inputs), Path(msg.expected), msg.rtol, msg.atol, TimingPlan(**msg.plan))
            else:
                out = model.infer(msg)
        except errors.AgentError as e:
            reply: Ok | Err = Err(e.code, e.message)
        except Exception as e:  # the runtime's own errors: reported, the worker lives on
            reply = Err(errors.INFERENCE_FAILED, f"{type(e).__name__}: {e}")
        else:
            reply = Ok(out)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def _preload(runtime: str) -> None:
    """Import the runtime's module and the runtime; a failure here shows again at load time."""
    import importlib

    from agent.backends import RUNTIME_MODULES

    try:
        mod = importlib.import_module(RUNTIME_MODULES[runtime])
        getattr(mod, "preload", lambda: None)()
    except Exception:
        pass


def _control(ctl: socket.socket, model: LoadedModel, owners: list[Any]) -> None:
    """The HTTP machinery loads only once the daemon hands a first connection over."""
    from agent.backends.wire import recv_ctl

    try:
        msg, fds = recv_ctl(ctl)
    except OSError:
        return
    if msg is None:
        return
    from agent.serving.adopted import serve_adopted

    serve_adopted(model, ctl, msg, fds, owners)


def main(fds_arg: str) -> None:
    """Entry point in the child process."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    from agent.backends import find_backend  # not agent.deploy.runner: the daemon's stack stays out
    from agent.backends.base import LoadOptions
    from agent.backends.unseal import load as sealed_load

    fds = [int(x) for x in fds_arg.split(",")]
    conns = [Channel(socket.socket(fileno=fd)) for fd in fds[:-1]]
    ctl = socket.socket(fileno=fds[-1])
    try:
        load = conns[0].recv()
        if isinstance(load, Preload):  # started ahead of its model (while the bundle downloads)
            _preload(load.runtime)
            load = conns[0].recv()
    except (EOFError, OSError):
        return
    if not isinstance(load, Load):
        return
    try:
        backend = find_backend(load.runtime)
        model = sealed_load(backend, Path(load.path), load.target,
                            LoadOptions(threads=load.threads, allow_spinning=load.allow_spinning, extra=load.extra))
    except errors.AgentError as e:
        conns[0].send(Err(e.code, e.message))
        return
    except Exception as e:
        conns[0].send(Err(errors.LOAD_FAILED, f"{type(e).__name__}: {e}"))
        return
    owners: list[Any] = []  # the direct path's owner, once the daemon hands a connection over
    threading.Thread(target=_control, args=(ctl, model, owners), name="control", daemon=True).start()
    conns[0].send(Ready(model.backend_id, model.inputs, model.outputs, os.getpid(), model.details))
    workers = [threading.Thread(target=_serve, args=(c, model), daemon=True) for c in conns]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for owner in owners:  # the calls answered since the last flush: the daemon reads them after we exit
        with contextlib.suppress(OSError):
            owner.flush_stats()
    model.close()
    sys.exit(0)
