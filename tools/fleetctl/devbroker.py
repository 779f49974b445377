"""A development MQTT broker for the demo when Mosquitto is not installed: amqtt on loopback.

amqtt (PyPI ``amqtt``, the ``demo`` extra) is a maintained asyncio MQTT broker. It speaks MQTT 3.1.1
only, so the agent's ``mqtt.protocol = "auto"`` falls back to 3.1.1 against it (docs/protocol.md).

Invariants:
- The broker runs in a child process (``python -m fleetctl.devbroker --port N``): its event loop,
  threads and log output never mix with the caller's, and stopping it cannot hang the caller.
- It listens on 127.0.0.1 only, on the port it is given; ``DevBroker.start`` waits at most
  ``START_TIMEOUT_S`` for the port to accept connections, ``stop`` at most ``STOP_TIMEOUT_S`` for a
  clean exit after SIGTERM, then kills it.
- No ``$SYS`` topics, no packet logging. Every client is accepted (loopback, development only) and
  keeps a persistent session when it asks for one: amqtt gives an anonymous client no persistent
  session, so ``LoopbackAuthPlugin`` accepts clients without marking them anonymous.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0  # amqtt imports and binds in about a second on a Pi-class machine
STOP_TIMEOUT_S = 5.0
POLL_S = 0.05
STDERR_TAIL_CHARS = 2000  # of a broker that exited early, shown in the error
AMQTT_MISSING = ("no MQTT broker: amqtt is not installed (pip install -e '.[demo]' in the checkout, which "
                 "tools/demo.sh does), nor is mosquitto (apt-get install -y mosquitto)")

log = logging.getLogger(__name__)


class DevBrokerError(RuntimeError):
    """The development broker could not be started."""


def broker_config(port: int, host: str = HOST) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener on ``host:port``, loopback clients accepted."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only the plugins named here are loaded: no $SYS publisher, no event or packet logger.
        "plugins": {"fleetctl.devbroker.LoopbackAuthPlugin": {}},
    }


def _free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class DevBroker:
    """amqtt in a child process on a free (or given) loopback port."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or _free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> DevBroker:
        """Start the broker and wait (bounded) until it accepts connections."""
        if importlib.util.find_spec("amqtt") is None:
            raise DevBrokerError(AMQTT_MISSING)
        tools = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = tools + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        err = open(self.log_path, "wb") if self.log_path else subprocess.PIPE  # noqa: SIM115 - child's lifetime
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleetctl.devbroker", "--port", str(self.port)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        finally:
            if not isinstance(err, int):
                err.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise DevBrokerError(f"the amqtt broker exited with status {self.proc.returncode} before listening "
                                     f"on {HOST}:{self.port}: {self._stderr_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise DevBrokerError(f"the amqtt broker was not listening on {HOST}:{self.port} after {timeout_s:.0f} s")
            time.sleep(POLL_S)

    def _stderr_tail(self) -> str:
        if self.proc is not None and self.proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                text = self.proc.stderr.read().decode("utf-8", "replace").strip()
                return text[-STDERR_TAIL_CHARS:] or "(no output)"
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                return self.log_path.read_text("utf-8", "replace")[-STDERR_TAIL_CHARS:] or "(no output)"
        return "(no output)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait (bounded) for a clean exit, else SIGKILL; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("amqtt broker (pid %d) did not stop within %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout_s)
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the child process ---------------------------------------------------------------------------

try:
    from amqtt.plugins.authentication import BaseAuthPlugin
except ImportError:  # the parent side needs no amqtt; the child reports its absence in main()
    BaseAuthPlugin = object


class LoopbackAuthPlugin(BaseAuthPlugin):
    """Accept every client, not marked anonymous, so a ``clean_session = false`` client keeps its
    session and its QoS 1 messages while offline (the broker listens on loopback only)."""

    async def authenticate(self, *, session: Any) -> bool:
        return True


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.wait_for(broker.shutdown(), STOP_TIMEOUT_S / 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleetctl.devbroker",
                                description="amqtt on 127.0.0.1 for local development (MQTT 3.1.1)")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    try:
        import amqtt  # noqa: F401
    except ImportError:
        print(AMQTT_MISSING, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="devbroker %(levelname)s %(name)s: %(message)s")
    # amqtt logs every refused or broken client at ERROR with a traceback; keep the demo's log readable
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    asyncio.run(_serve(a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
