"""`edge-agent init --dev DIR`: a config the daemon accepts, a trust folder holding the public half
of the key fleetctl signs with, nothing overwritten without --force, bad values refused before
anything is written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from agent import config
from agent.bundles.trust import TrustStore, key_id, load_private_key


def init(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "init", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_init_writes_a_config_trust_folder_and_key_that_belong_together(tmp_path: Path) -> None:
    r = init("--dev", "dev", "--broker", "mqtt://127.0.0.1:1999", "--api-port", "18471", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "dev"
    cfg = config.load(str(d / "agent.toml"))
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1999" and cfg.api.listen == "127.0.0.1:18471"
    assert cfg.device_id == "dev-device"
    for path in (cfg.state_dir, cfg.trust.keys_dir, cfg.api.control_socket):
        assert Path(path).is_relative_to(d), path  # everything inside DIR
    assert stat.S_IMODE(os.stat(d / "keys" / "fleet.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / "trust").st_mode) & 0o022 == 0
    store = TrustStore.load(d / "trust")
    assert store.writable_by_others() == []
    kid = key_id(load_private_key(d / "keys" / "fleet.key").public_key())
    assert list(store.key_ids()) == [kid]
    # The printed next steps use this setup's paths and ports.
    assert "FLEETCTL_KEY=$PWD/dev/keys/fleet.key" in r.stdout and "EDGE_AGENT_CONFIG=$PWD/dev/agent.toml" in r.stdout
    assert "http://127.0.0.1:18471/v2/models/mymodel/infer" in r.stdout, r.stdout


def test_init_does_not_overwrite_without_force_and_force_replaces_the_trusted_key(tmp_path: Path) -> None:
    assert init("--dev", "dev", cwd=tmp_path).returncode == 0
    d = tmp_path / "dev"
    before = (d / "keys" / "fleet.key").read_bytes()
    r = init("--dev", "dev", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr, r.stderr
    assert (d / "keys" / "fleet.key").read_bytes() == before
    (d / "trust" / "old.pem").write_bytes((d / "trust" / "fleet.pem").read_bytes())
    assert init("--dev", "dev", "--force", cwd=tmp_path).returncode == 0
    assert (d / "keys" / "fleet.key").read_bytes() != before
    store = TrustStore.load(d / "trust")
    assert list(store.key_ids()) == [key_id(load_private_key(d / "keys" / "fleet.key").public_key())]


def test_init_refuses_bad_values_before_writing(tmp_path: Path) -> None:
    r = init("--dev", "dev", "--broker", "http://127.0.0.1:1883", cwd=tmp_path)
    assert r.returncode == 1 and "mqtt.url" in r.stderr, r.stderr
    r = init("--dev", "dev", "--api-port", "70000", cwd=tmp_path)
    assert r.returncode == 1 and "--api-port" in r.stderr, r.stderr
    assert not (tmp_path / "dev").exists()
