"""Attacks that need the daemon to restart, and offline installs, against one real daemon.

Offline bundles in each archive format install through ``agentctl install`` (the same deploy
state machine as a fleet deploy). Then the daemon is stopped and started around each attack:
what it must remember (command ids, the high-water mark, the last trusted time) survives, and it
refuses to start on an unsafe trust folder. Every test ends with the serving model answering
KServe v2 with the version that served before the attack. Ids (R, K, T, C) match docs/security.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentproc import START_TIMEOUT_S
from conftest import start_mosquitto
from security.attacklib import Bundles, Device, Fleet, HostileServer, assert_refused

from agent.bundles.trust import public_pem
from fleetctl.bundle import pack_bundle

EXIT_UNSAFE = 3
PROBATION_S = 1.0  # a replaced version's probation; short, so the install jobs end within the test


@dataclass
class Life:
    dev: Device
    fleet: Fleet
    bundles: Bundles
    http: HostileServer
    tmp: Path
    serving: int = 1

    def url(self, rel: str) -> str:
        return self.http.url(f"{rel}/manifest.json")

    def still_serving(self) -> None:
        self.dev.assert_serving(self.serving)

    def ensure_running(self) -> None:
        p = self.dev.proc.proc
        if p is None or p.poll() is not None:
            self.dev.start()


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Life]:
    tmp = tmp_path_factory.mktemp("restart")
    (tmp / "mosquitto").mkdir()
    broker = start_mosquitto(tmp / "mosquitto")
    fleet = Fleet()
    (tmp / "www").mkdir()
    bundles = Bundles(tmp / "www", fleet)
    http = HostileServer(tmp / "www")
    dev = Device(tmp / "device", broker, fleet, extra_toml=f"\n[deploy]\nprobation_s = {PROBATION_S}\n")
    try:
        dev.start()
        up = dev.deploy(http.url(f"{bundles.write(1)}/manifest.json"))
        assert up["state"] == "SUCCEEDED", (up, dev.log_tail())
        dev.expected_serving = bundles.expected_serving
        dev.assert_serving(1)
        yield Life(dev, fleet, bundles, http, tmp)
    finally:
        dev.close()
        http.close()
        broker.stop()


def fleetctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetctl.main", *args], capture_output=True, text=True, timeout=60)


def test_offline_install_each_archive_format(life: Life) -> None:
    """Not an attack: `fleetctl bundle pack` → `bundle verify` → `agentctl install`, per format."""
    life.ensure_running()
    trust = life.dev.trust_dir
    for version, suffix in ((life.serving + 1, "tar.gz"), (life.serving + 2, "zip"), (life.serving + 3, "tar")):
        rel = life.bundles.write(version)
        out = life.tmp / f"lin-{version}.{suffix}"
        r = fleetctl("bundle", "pack", str(life.bundles.folder(rel)), "--out", str(out))
        assert r.returncode == 0, r.stderr
        r = fleetctl("bundle", "verify", str(out), "--trust", str(trust), "--threshold", "2")
        assert r.returncode == 0 and f"OK lin v{version}" in r.stdout, r.stderr
        rc, doc = life.dev.install(out)
        assert rc == 0 and (doc["state"], doc["step"]) == ("IN_PROGRESS", "probation"), doc  # v{n-1} stays as fallback
        assert doc["result"]["version"] == version and doc["job"].startswith("local-install-")
        life.serving = version
        life.still_serving()
    life.dev.obs.wait(lambda t, d: t == f"edge/dev1/jobs/{doc['job']}" and d.get("state") == "SUCCEEDED",
                      timeout_s=PROBATION_S + 10, what="the end of probation")
    jobs = json.loads(life.dev.agentctl("jobs", "--json").stdout)
    assert {j["id"]: j["state"] for j in jobs if j["type"] == "install"}[doc["job"]] == "SUCCEEDED"


def test_R01_replay_across_a_restart(life: Life) -> None:
    life.ensure_running()
    cid, env = life.fleet.command("ping", {})
    assert life.dev.run(cid, env)["state"] == "SUCCEEDED"
    life.dev.restart()
    up = life.dev.run(cid, env)
    assert_refused(up, "REJECTED", "replayed")
    assert up["recorded"]["state"] == "SUCCEEDED"
    life.still_serving()


def test_R02_high_water_mark_across_a_restart(life: Life) -> None:
    life.ensure_running()
    old = life.bundles.write(life.serving)  # the serving version, validly signed, offered again
    older = life.bundles.write(life.serving - 1) if life.serving > 1 else old
    archive = pack_bundle(life.bundles.folder(older), life.tmp / "older.zip")
    life.dev.restart()
    assert_refused(life.dev.deploy(life.url(old)), "REJECTED", "rollback_refused")
    assert_refused(life.dev.deploy(life.url(older)), "REJECTED", "rollback_refused")
    rc, doc = life.dev.install(archive)
    assert rc == 1 and doc["state"] == "REJECTED" and doc["error"]["code"] == "rollback_refused", doc
    life.still_serving()


@pytest.mark.parametrize(("sid", "what"), [("K05", "folder"), ("K06", "key")], ids=["K05-folder", "K06-key"])
def test_K05_K06_trust_writable_by_others_refuses_start(life: Life, sid: str, what: str) -> None:
    life.ensure_running()
    dev = life.dev
    assert dev.stop() == 0
    target = dev.trust_dir if what == "folder" else dev.trust_dir / "a.pem"
    mode = target.stat().st_mode & 0o7777
    target.chmod(0o777 if what == "folder" else 0o666)
    log_size = dev.proc.log.stat().st_size
    try:
        dev.proc.start(wait=False)
        assert dev.proc.proc is not None
        rc = dev.proc.proc.wait(START_TIMEOUT_S)
        dev.proc.stop()
        assert rc == EXIT_UNSAFE
        log = dev.proc.log.read_text(errors="replace")[log_size:]
        assert "unsafe_trust" in log and "writable by others" in log and str(target) in log, log[-2000:]
    finally:
        target.chmod(mode)
    dev.start()
    life.still_serving()


def test_T02_clock_behind_the_last_trusted_time_at_start(life: Life) -> None:
    life.ensure_running()
    dev = life.dev
    assert dev.stop() == 0
    seen = {id(d) for d in dev.obs.find(lambda t, d: t == "edge/dev1/status")}
    dev.set_kv("last_trusted_time", time.time() + 86400)
    dev.start()
    st = dev.obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True and id(d) not in seen,
                      what="birth status")
    assert st.get("clock") == "untrusted" and "earlier than the last trusted time" in st["clock_reason"], st
    rel = life.bundles.write(life.serving + 1)
    archive = pack_bundle(life.bundles.folder(rel), life.tmp / "clock.tar.gz")
    rc, doc = dev.install(archive)
    assert rc == 1 and doc["state"] == "REJECTED" and doc["error"]["code"] == "clock_untrusted", doc
    life.still_serving()
    assert dev.stop() == 0
    dev.set_kv("last_trusted_time", time.time() - 3600)
    seen = {id(d) for d in dev.obs.find(lambda t, d: t == "edge/dev1/status")}
    dev.start()
    st = dev.obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True and id(d) not in seen,
                      what="birth status")
    assert "clock" not in st, st
    life.still_serving()


def test_C19_require_signed_commands_governs_unsigned_ones(life: Life) -> None:
    life.ensure_running()
    dev = life.dev
    cfg = dev.proc.config
    original = cfg.read_text()

    def unsigned_ping(cid: str) -> dict[str, object]:
        now = time.time()
        doc = {"v": 1, "id": cid, "type": "ping", "target": {"device": "dev1"},
               "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
               "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600))}
        return dev.run(cid, json.dumps(doc))

    try:
        assert dev.stop() == 0
        cfg.write_text(original.replace("[trust]\n", "[trust]\nrequire_signed_commands = false\n", 1))
        dev.start()
        assert unsigned_ping(f"unsigned-{time.time_ns()}")["state"] == "SUCCEEDED"
        # Signed commands are still checked in full: an unknown signer is refused (and, its id
        # not believed, answered by no job update: counted).
        cid, env = life.fleet.command("ping", {}, keys=[life.fleet.x])
        dev.send_unanswered(cid, env)
        assert dev.refused_counts() == {"untrusted_key": 1}
    finally:
        if dev.proc.proc is not None and dev.proc.proc.poll() is None:
            dev.stop()
        cfg.write_text(original)
    dev.start()
    cid = f"unsigned-{time.time_ns()}"
    now = time.time()
    dev.send_unanswered(cid, json.dumps({"v": 1, "id": cid, "type": "ping", "target": {"device": "dev1"},
                                         "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                                         "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600))}))
    assert dev.refused_counts() == {"unsigned_command": 1}
    life.still_serving()


def test_rotated_key_survives_a_restart(life: Life) -> None:
    """Not an attack: a key added by a signed `trust` command is on disk and counts after a restart."""
    life.ensure_running()
    f = life.fleet
    cid, env = f.command("trust", {"add": [public_pem(f.y.public_key()).decode()]})
    assert life.dev.run(cid, env)["state"] == "SUCCEEDED"
    life.dev.restart()
    cid, env = f.command("ping", {}, keys=[f.y, f.c])
    assert life.dev.run(cid, env)["state"] == "SUCCEEDED"
    life.still_serving()
