"""The command path under attack: floods, a full state folder, a clock set back, busy neighbours.

Each test runs its own real daemon (threshold 2 over keys a, b, c; `lin` v1 serving) behind a
real Mosquitto, attacks it as the scenario says and asserts the code or the bound and that KServe
v2 still answers with the version that served before. Scenario ids (Q) match docs/security.md.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import datetime
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Mosquitto
from integration.test_agentctl_permissions import accounts  # noqa: F401 - a fixture
from paho.mqtt.enums import CallbackAPIVersion
from security.attacklib import (
    DEVICE,
    TERMINAL,
    Bundles,
    Device,
    Fleet,
    HostileServer,
    assert_refused,
)

from agent.timeutil import now_rfc3339

FLOOD_N = 3000  # unsigned QoS 1 messages, each with its own id
FLOOD_PUBACK_S = 60.0  # the broker acknowledges the whole flood within this
FLOOD_HANDLED_S = 60.0  # ... and the daemon has counted every message within this
FLOOD_LOG_MAX_BYTES = 20_000  # the log may grow this much for the whole flood (was ~520 B a message)
HEARTBEAT_S = 0.5
HEARTBEAT_GAP_MAX_S = 30.0  # heartbeats keep coming through the flood (thinned, they came every 900 s)
BUDGET_ALLOWANCE_BYTES = 200_000  # what the budget allows by now: the old job-update flood (~1 MB) would thin it
STATE_TMPFS_BYTES = 128 * 2**20  # room for the store and the runtime caches; then filled
FULL_WAIT_S = 3.0  # with the folder full, commands are given this long to be answered or held
FAKE_OFFSET = "-95m"
BENCH_CALLS = 4  # the bound of local bench calls (LOCAL_BENCH_MAX)
BENCH_EXTRA = 2  # calls over the bound
BENCH_REFUSED_S = 30.0  # the calls over the bound are answered within this
BENCH_DONE_S = 280.0
BENCH_ITERATIONS = 10_000


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@contextlib.contextmanager
def device(root: Path, mosquitto: Mosquitto, fleet: Fleet, www: Path, edit: Any = None,
           before_start: Any = None) -> Iterator[tuple[Device, Bundles, HostileServer]]:
    """A daemon serving ``lin`` v1 (``edit`` changes its config text, ``before_start`` runs on
    its folder before it starts)."""
    www.mkdir(parents=True, exist_ok=True)
    bundles = Bundles(www, fleet)
    http = HostileServer(www)
    dev = Device(root, mosquitto, fleet)
    try:
        if edit is not None:
            dev.proc.config.write_text(edit(dev.proc.config.read_text()))
        if before_start is not None:
            before_start(dev)
        dev.start()
        done = dev.deploy(http.url(f"{bundles.write(1)}/manifest.json"))
        assert done["state"] == "SUCCEEDED", (done, dev.log_tail())
        dev.expected_serving = bundles.expected_serving
        dev.assert_serving(1)
        yield dev, bundles, http
    finally:
        dev.close()
        http.close()


def heartbeat_gaps(dev: Device, since: float) -> list[float]:
    ts = sorted(datetime.datetime.fromisoformat(d["ts"].replace("Z", "+00:00")).timestamp()
                for d in dev.obs.find(lambda t, d: t == f"edge/{DEVICE}/heartbeat"))
    ts = [t for t in ts if t >= since]
    return [b - a for a, b in itertools.pairwise(ts)]


def telemetry_setting(dev: Device, key: str) -> Any:
    r = dev.agentctl("config", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["telemetry"][key]


# ---------------------------------------------------------------- Q01 unsigned flood


def _flood(mosquitto: Mosquitto, n: int) -> list[str]:
    """``n`` unsigned QoS 1 commands with unique ids, as fast as the broker takes them."""
    ids = [f"flood-{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flooder-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(200)
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    try:
        infos = []
        for cid in ids:
            doc = (f'{{"v":1,"id":"{cid}","type":"deploy","target":{{"device":"{DEVICE}"}},'
                   f'"issued_at":"{now_rfc3339()}","expires_at":"2099-01-01T00:00:00Z",'
                   '"params":{"model":"lin","manifest_url":"http://127.0.0.1:9/x"}}')
            infos.append(c.publish(f"edge/{DEVICE}/cmd", doc, qos=1))
        deadline = time.monotonic() + FLOOD_PUBACK_S
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not take the whole flood in time"
    finally:
        c.loop_stop()
        c.disconnect()
    return ids


def test_Q01_unsigned_flood_costs_the_fleet_nothing(tmp_path: Path, mosquitto: Mosquitto, fleet: Fleet) -> None:
    """Thousands of unsigned QoS 1 commands with unique ids: no job update under any of them,
    every one counted, one rate-limited event, the log bounded, heartbeats not thinned, and a
    signed command right after succeeds."""
    day_frac = (time.time() % 86400) / 86400
    budget_mb = BUDGET_ALLOWANCE_BYTES / (day_frac + 0.1) / 2**20  # allowance now ≈ BUDGET_ALLOWANCE_BYTES

    def edit(text: str) -> str:
        return text.replace("[telemetry]\n", f"[telemetry]\ndaily_budget_mb = {budget_mb:.6f}\n", 1)

    with device(tmp_path / "device", mosquitto, fleet, tmp_path / "www", edit) as (dev, _, _):
        log_before = dev.proc.log.stat().st_size
        t0 = time.time()
        ids = _flood(mosquitto, FLOOD_N)
        deadline = time.monotonic() + FLOOD_HANDLED_S
        while dev.refused_counts().get("unsigned_command", 0) < FLOOD_N:
            assert time.monotonic() < deadline, (dev.refused_counts(), dev.log_tail())
            time.sleep(0.2)
        pid, ping = fleet.command("ping", {})
        assert dev.run(pid, ping)["state"] == "SUCCEEDED"
        assert dev.refused_counts() == {"unsigned_command": FLOOD_N}
        flood_ids = set(ids)
        assert not dev.obs.find(lambda t, d: t.startswith(f"edge/{DEVICE}/jobs/") and t.rsplit("/", 1)[1] in flood_ids)
        events = dev.obs.find(lambda t, d: t == f"edge/{DEVICE}/events" and d.get("event") == "commands_refused")
        assert 1 <= len(events) <= 1 + (time.time() - t0) // 60, events  # one a minute at most
        assert dev.proc.log.stat().st_size - log_before < FLOOD_LOG_MAX_BYTES
        metrics = dev.http.get(f"{dev.proc.api}/metrics", timeout=5).text
        assert f'edge_agent_commands_refused_unauthenticated_total{{code="unsigned_command"}} {FLOOD_N}' in metrics
        status = dev.agentctl("status", "--json")
        assert '"thinned": false' in status.stdout, status.stdout
        time.sleep(HEARTBEAT_S * 4)  # a few more heartbeats after the flood
        gaps = heartbeat_gaps(dev, t0)
        assert len(gaps) >= 2 and max(gaps) <= HEARTBEAT_GAP_MAX_S, gaps
        assert not dev.obs.find(lambda t, d: t == f"edge/{DEVICE}/heartbeat" and "budget" in d)  # never thinned
        dev.assert_serving(1)


# ---------------------------------------------------------------- Q02 state folder full


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (the test runs as root, as .ci/run does): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to 100 %; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # big writes, then the last pages, then the last bytes
            with contextlib.suppress(OSError):
                while os.write(fd, b"\xff" * size):
                    pass
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0, "the folder is not full"
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")
def test_Q02_state_folder_full_commands_are_answered_or_redelivered(tmp_path: Path, mosquitto: Mosquitto,
                                                                    fleet: Fleet) -> None:
    """State folder on a small tmpfs filled to 100 %: every signed command either gets its job
    update now (its final one, or ``QUEUED`` with ``delayed.code`` ``disk_full``) or stays
    unacknowledged; once space returns every one of them completes. Nothing is lost or silent,
    and the serving version does not change."""
    with tmpfs(tmp_path / "device" / "state", STATE_TMPFS_BYTES), \
            device(tmp_path / "device", mosquitto, fleet, tmp_path / "www") as (dev, _, _):
        filler = fill(dev.root / "state")
        sent = []
        for type_, params in (("config", {"set": {"telemetry.error_rate_pct": 42}}), ("ping", {}),
                              ("config", {"set": {"telemetry.slo_p99_ms": 777}})):
            cid, env = fleet.command(type_, params)
            dev.send(env)
            sent.append(cid)
        time.sleep(FULL_WAIT_S)
        while_full = {cid: [u["state"] for u in dev.updates(cid)] for cid in sent}
        for cid in sent:
            for u in dev.updates(cid):
                if u["state"] == "QUEUED" and "delayed" in u:
                    assert u["delayed"]["code"] == "disk_full", u
                elif u["state"] in ("FAILED", "REJECTED"):
                    assert (u.get("error") or {}).get("code") == "disk_full", u
        dev.assert_serving(1)
        filler.unlink()
        finals = {}
        for cid in sent:
            finals[cid] = dev.obs.wait(lambda t, d, c=cid: t == f"edge/{DEVICE}/jobs/{c}" and d.get("state") in TERMINAL,
                                       timeout_s=30, what=f"final update of {cid} once space returned")
        for up in finals.values():
            assert up["state"] == "SUCCEEDED" or (up.get("error") or {}).get("code") == "disk_full", (up, while_full)
        # Nothing left hanging: a command refused for the disk is not half-applied, one that
        # succeeded is in effect.
        if finals[sent[0]]["state"] == "SUCCEEDED":
            assert telemetry_setting(dev, "error_rate_pct") == 42
        pid, ping = fleet.command("ping", {})
        assert dev.run(pid, ping)["state"] == "SUCCEEDED"
        dev.assert_serving(1)
        assert "Exception in thread" not in dev.proc.log.read_text(errors="replace"), "a thread died of the full disk"


# ---------------------------------------------------------------- Q03 clock set back


def _faketime_lib() -> str | None:
    for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"):
        if os.path.exists(p):
            return p
    found = ctypes.util.find_library("faketime")
    return found


def test_Q03_clock_set_back_does_not_revive_refused_commands(tmp_path: Path, mosquitto: Mosquitto, fleet: Fleet) -> None:
    """A signed ``config`` refused as ``expired`` stays refused after a restart with the clock
    95 minutes earlier (libfaketime on the daemon); while the clock is behind the latest
    verified ``issued_at`` every state-changing command is refused ``clock_untrusted``, read-only
    ones still work, and nothing changes what serves."""
    lib = _faketime_lib()
    if lib is None:
        pytest.fail("libfaketime is not installed (apt-get install faketime; tools/test.sh checks for it)")

    def edit(text: str) -> str:
        # In-process runtime: under libfaketime with a real monotonic clock Python 3.11's
        # time.sleep fails (EINVAL, libfaketime #426), which a worker process's waits would hit.
        return text + '\n[backends]\nisolation = "none"\n'

    with device(tmp_path / "device", mosquitto, fleet, tmp_path / "www", edit) as (dev, _, _):
        # Valid from 2 h ago for 1 h: expired now, valid again by a clock 95 minutes earlier.
        old_cid, old = fleet.command("config", {"set": {"telemetry.error_rate_pct": 13}},
                                     issued_at=time.time() - 7200, ttl_s=3600 + 30 * 60)
        assert_refused(dev.run(old_cid, old), "REJECTED", "expired")
        pid, ping = fleet.command("ping", {})  # a verified issued_at of now
        assert dev.run(pid, ping)["state"] == "SUCCEEDED"
        assert dev.stop() == 0
        dev.proc.env = {"LD_PRELOAD": lib, "FAKETIME": FAKE_OFFSET, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                        "FAKETIME_NO_CACHE": "1"}
        dev.start()
        dev.obs.wait(lambda t, d: t == f"edge/{DEVICE}/status" and d.get("clock") == "untrusted",
                     what="status with the clock untrusted")
        # The expired command, resent: still refused (by its recorded refusal or the clock).
        up = dev.run(old_cid, old)
        assert up["state"] == "REJECTED" and up["error"]["code"] in ("expired", "clock_untrusted"), up
        # A fresh config, issued by a fleet whose clock agrees with the device's: refused.
        cid, env = fleet.command("config", {"set": {"telemetry.error_rate_pct": 14}}, issued_at=time.time() - 95 * 60)
        assert_refused(dev.run(cid, env), "REJECTED", "clock_untrusted", "earlier than the last trusted time")
        for type_, params in (("rollback", {"model": "lin"}), ("remove", {"model": "lin"}),
                              ("trust", {"remove": ["0" * 64]})):
            cid, env = fleet.command(type_, params, issued_at=time.time() - 95 * 60)
            assert_refused(dev.run(cid, env), "REJECTED", "clock_untrusted")
        # Read-only commands still answer.
        pid, ping = fleet.command("ping", {}, issued_at=time.time() - 95 * 60)
        assert dev.run(pid, ping)["state"] == "SUCCEEDED"
        assert telemetry_setting(dev, "error_rate_pct") not in (13, 14)
        dev.assert_serving(1)
        # The clock fixed: the expired command stays refused (its refusal is recorded by id).
        assert dev.stop() == 0
        dev.proc.env = {}
        dev.start()
        assert_refused(dev.run(old_cid, old), "REJECTED", "expired")
        dev.assert_serving(1)


# ---------------------------------------------------------------- Q04 read-only callers and the fleet


def test_Q04_read_only_bench_calls_do_not_delay_fleet_commands(mosquitto: Mosquitto, fleet: Fleet,
                                                               accounts: dict[str, str]) -> None:  # noqa: F811
    """A control-group (read-only) user starts as many long ``bench`` calls as allowed (and one
    more, refused ``busy``); a signed fleet rollback sent then completes while they still run."""
    from integration.test_agentctl_permissions import _python_for

    root = Path(tempfile.mkdtemp(prefix="eat-bench-", dir="/tmp"))
    root.chmod(0o755)

    def edit(text: str) -> str:
        text = text.replace('control_group = ""', f'control_group = "{accounts["ctl"]}"\nadmin_group = "{accounts["adm"]}"')
        return text + "\n[deploy]\nprobation_s = 0\n"  # v2 serves at once: the rollback has somewhere to go

    def before_start(d: Device) -> None:
        d.root.chmod(0o755)

    try:
        with device(root / "device", mosquitto, fleet, root / "www", edit, before_start) as (dev, bundles, http):
            up = dev.deploy(http.url(f"{bundles.write(2)}/manifest.json"))
            assert up["state"] == "SUCCEEDED", up
            py = _python_for(accounts["reader"])
            cmd = ["runuser", "-u", accounts["reader"], "--", *py, "-m", "agent.cli.agentctl", "bench", "lin",
                   "-n", str(BENCH_ITERATIONS), "--backends", "onnxruntime:CPUExecutionProvider", "--json", "--socket", str(dev.proc.socket)]
            # More calls than the bound at once: the extra ones are refused busy at once.
            calls = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(BENCH_CALLS + BENCH_EXTRA)]
            try:
                refused = []
                deadline = time.monotonic() + BENCH_REFUSED_S
                while len(refused) < BENCH_EXTRA and time.monotonic() < deadline:
                    refused = [p for p in calls if p.poll() is not None]
                    time.sleep(0.05)
                assert len(refused) == BENCH_EXTRA, "the calls over the bound were not refused at once"
                cid, env = fleet.command("rollback", {"model": "lin"})
                done = dev.run(cid, env)
                running = [p for p in calls if p.poll() is None]
                assert done["state"] == "SUCCEEDED" and done["result"]["version"] == 1, done
                assert running, "every bench finished before the rollback: the test proves nothing; raise BENCH_ITERATIONS"
            finally:
                for p in calls:
                    p.wait(BENCH_DONE_S)
            results = [(p.returncode, *p.communicate()) for p in calls]
            assert sorted(rc for rc, _, _ in results) == [0] * BENCH_CALLS + [1] * BENCH_EXTRA, results
            for rc, out, err in results:
                if rc:
                    assert "busy" in out + err, (out, err)
            dev.assert_serving(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
