"""``agentctl logs``: the daemon's log, wherever it goes.

Where from, in order: ``--file PATH``; the file the running daemon's stderr points to (it says
so through the control socket's ``hello``); journald (``journalctl -u edge-agent``) when the
journal is there; otherwise an explanation of what was looked at. ``-f`` follows (Ctrl-C ends
it, ``--duration`` bounds it), ``-n`` picks the number of lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from typing import TextIO

UNIT = "edge-agent"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
FOLLOW_POLL_S = 0.25
HELLO_TIMEOUT_S = 3.0
JOURNALCTL_TIMEOUT_S = 30.0  # a non-following journalctl read


def journal_available() -> bool:
    return shutil.which("journalctl") is not None and os.path.exists(JOURNAL_SOCKET)


def daemon_log_file(socket_path: str) -> tuple[str | None, str]:
    """(the daemon's stderr file, or None; what was found) — from the daemon itself."""
    from agent import errors
    from agent.serving.control import ControlClient

    try:
        hello = ControlClient(socket_path, timeout_s=HELLO_TIMEOUT_S).call("hello")
    except (OSError, ConnectionError, errors.AgentError, ValueError) as e:
        return None, f"the daemon is not reachable at {socket_path} ({e})"
    target = hello.get("log") or ""
    if target.startswith("/") and os.path.isfile(target):
        return target, f"the daemon (pid {hello.get('pid')}) writes its log to {target}"
    return None, f"the daemon (pid {hello.get('pid')}) logs to {target or 'an unknown place'}"


def _emit(line: str, as_json: bool, out: TextIO, source: str) -> None:
    if as_json:
        out.write(json.dumps({"source": source, "line": line.rstrip("\n")}) + "\n")
    else:
        out.write(line if line.endswith("\n") else line + "\n")


def tail_file(path: str, lines: int, follow: bool, as_json: bool, duration_s: float | None = None,
              out: TextIO | None = None) -> int:
    """The last ``lines`` lines of ``path``; with ``follow`` keep printing what is appended."""
    stream = out or sys.stdout
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError as e:
        print(f"agentctl: cannot read {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    with f:
        for line in deque(f, maxlen=lines) if lines > 0 else []:
            _emit(line, as_json, stream, path)
        stream.flush()
        if not follow:
            return 0
        deadline = None if duration_s is None else time.monotonic() + duration_s
        pending = ""
        try:
            while deadline is None or time.monotonic() < deadline:
                chunk = f.readline()
                if not chunk:
                    time.sleep(FOLLOW_POLL_S)
                    continue
                pending += chunk
                if pending.endswith("\n"):
                    _emit(pending, as_json, stream, path)
                    stream.flush()
                    pending = ""
        except KeyboardInterrupt:
            pass
    return 0


def journal(lines: int, follow: bool, as_json: bool, duration_s: float | None = None) -> int:
    cmd = ["journalctl", "-u", UNIT, "-n", str(lines), "--no-pager", "-o", "json" if as_json else "short-iso"]
    if follow:
        cmd.append("-f")
    try:
        if follow:
            proc = subprocess.Popen(cmd)
            try:
                proc.wait(duration_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(HELLO_TIMEOUT_S)
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait(HELLO_TIMEOUT_S)
            return 0
        return subprocess.run(cmd, timeout=JOURNALCTL_TIMEOUT_S, check=False).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"agentctl: journalctl failed: {e}", file=sys.stderr)
        return 1


def show(socket_path: str, *, file: str | None, lines: int, follow: bool, as_json: bool,
         duration_s: float | None = None) -> int:
    """Pick the source and print from it; exit 1 with an explanation when there is none."""
    if file:
        return tail_file(file, lines, follow, as_json, duration_s)
    path, found = daemon_log_file(socket_path)
    if path:
        print(f"# {found}", file=sys.stderr)
        return tail_file(path, lines, follow, as_json, duration_s)
    if journal_available():
        print(f"# {found}; reading journald (journalctl -u {UNIT})", file=sys.stderr)
        return journal(lines, follow, as_json, duration_s)
    print(f"agentctl: no log to show: {found}; journald is not available here "
          f"(no journalctl or no {JOURNAL_SOCKET}).\n"
          "The daemon logs to stderr: run it under systemd (journald keeps the log), or redirect its stderr "
          "to a file and use `agentctl logs --file PATH`.", file=sys.stderr)
    return 1

