"""Messages a newcomer acts on, as pure functions: each names the thing at fault and the fix
(key ids and the trust folder, known config sections and keys, group- vs world-writable, why a
device is silent, the probation countdown)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config, errors
from agent.bundles import dsse
from agent.bundles.trust import TrustStore, folder_problem, key_id, public_pem
from fleetctl.follow import ProbationCountdown, silent_device_message


def _trust_folder(tmp_path: Path, *keys: Ed25519PrivateKey) -> Path:
    folder = tmp_path / "trust"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    for i, k in enumerate(keys):
        (folder / f"k{i}.pem").write_bytes(public_pem(k.public_key()))
    return folder


def _untrusted(env: dict[str, object], trust: TrustStore) -> errors.RejectError:
    with pytest.raises(errors.RejectError) as ei:
        dsse.verify(env, dsse.COMMAND_TYPE, trust, 1, what="command")
    assert ei.value.code == errors.UNTRUSTED_KEY
    return ei.value


def test_untrusted_key_names_signer_trusted_ids_and_where_the_key_goes(tmp_path: Path) -> None:
    a, b, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    folder = _trust_folder(tmp_path, a, b)
    e = _untrusted(dsse.sign(dsse.COMMAND_TYPE, b"{}", [stranger]), TrustStore.load(folder))
    sid, aid, bid = (key_id(k.public_key()) for k in (stranger, a, b))
    assert f"signed by key id {sid[:16]}… which is not in {folder}" in e.message
    assert aid[:16] in e.message and bid[:16] in e.message
    assert f"copy the signer's public key (.pub.pem) into {folder}" in e.message
    assert e.details == {"signer_key_ids": [sid], "trusted_key_ids": sorted([aid, bid])}


def test_untrusted_key_never_echoes_a_non_hex_key_id_and_names_an_empty_or_missing_folder(tmp_path: Path) -> None:
    k = Ed25519PrivateKey.generate()
    env = dsse.sign(dsse.COMMAND_TYPE, b"{}", [Ed25519PrivateKey.generate()])
    env["signatures"][0]["keyid"] = "<b>forged\nline</b>"
    e = _untrusted(env, TrustStore.load(_trust_folder(tmp_path, k)))
    assert "forged" not in e.message and "(not a hex key id)" in e.message
    e = _untrusted(dsse.sign(dsse.COMMAND_TYPE, b"{}", []), TrustStore.load(tmp_path / "trust"))
    assert "carries no signature" in e.message and "sign it with a key whose public key is in" in e.message
    missing = tmp_path / "absent"
    e = _untrusted(env, TrustStore.load(missing))
    assert f"the trust folder {missing} does not exist" in e.message and "install -d" in e.message


def test_trust_folder_problem_missing_group_and_world_writable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert f"{missing} does not exist" in (folder_problem(missing) or "")
    folder = _trust_folder(tmp_path, Ed25519PrivateKey.generate())
    assert folder_problem(folder) is None
    os.chmod(folder, 0o775)
    msg = folder_problem(folder) or ""
    assert f"{folder} is group-writable" in msg and f"chmod go-w {folder}" in msg and "world" not in msg
    os.chmod(folder, 0o757)
    assert f"{folder} is world-writable" in (folder_problem(folder) or "")
    os.chmod(folder, 0o755)
    os.chmod(folder / "k0.pem", 0o664)
    assert f"{folder / 'k0.pem'} is group-writable" in (folder_problem(folder) or "")


def test_unknown_section_lists_the_known_ones_and_the_closest() -> None:
    with pytest.raises(errors.ConfigError) as ei:
        config.from_dict({"mqqt": {"url": "mqtt://x"}})
    msg = ei.value.message
    assert msg.startswith("unknown section [mqqt] (did you mean [mqtt]?)")
    assert "known sections: [mqtt], [trust]" in msg and "[deploy]" in msg


def test_unknown_key_lists_the_sections_keys_and_the_closest() -> None:
    with pytest.raises(errors.ConfigError) as ei:
        config.from_dict({"deploy": {"probation": 5}})
    msg = ei.value.message
    assert "deploy.probation: unknown key in [deploy] (did you mean probation_s?)" in msg
    assert "known keys: probation_s, probation_max_errors" in msg
    with pytest.raises(errors.ConfigError) as ei:
        config.from_dict({"devce_id": "a"})
    assert "(did you mean device_id?)" in ei.value.message and "known sections: [mqtt]" in ei.value.message
    with pytest.raises(errors.ConfigError) as ei:  # nothing close: no guess, still the list
        config.from_dict({"zzzz": {}})
    assert "did you mean" not in ei.value.message and "known sections:" in ei.value.message
    with pytest.raises(errors.ConfigError) as ei:  # the remote `config` command's dotted keys too
        config.set_dotted(config.Config(device_id="d"), "telemetry.heartbeat", 5)
    assert "(did you mean heartbeat_s?)" in ei.value.message


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_probation_countdown_lines_from_the_window_and_every_few_seconds() -> None:
    clock = _Clock()
    c = ProbationCountdown(every_s=5.0, clock=clock)
    assert c.update("d1", {"state": "IN_PROGRESS", "step": "probation"}) is None  # window not known yet
    assert c.update("d1", {"state": "IN_PROGRESS", "step": "probation",
                           "probation": {"window_s": 60}}) == "d1: probation: 60 s left"
    clock.t += 4.0
    assert c.tick() == []
    clock.t += 1.5
    assert c.tick() == ["d1: probation: 54 s left"]
    assert c.left_s("d1") == pytest.approx(54.5)
    c.update("d1", {"state": "SUCCEEDED"})
    clock.t += 10
    assert c.tick() == [] and c.left_s("d1") is None


def test_probation_countdown_without_a_window_counts_up() -> None:
    clock = _Clock()
    c = ProbationCountdown(every_s=5.0, clock=clock)
    c.update("d1", {"state": "IN_PROGRESS", "step": "probation", "probation": {"window_s": "soon"}})
    clock.t += 6
    (line,) = c.tick()
    assert line.startswith("d1: probation: 6 s so far") and "deploy.probation_s" in line


def test_silent_device_message_offline_unknown_online() -> None:
    unknown = silent_device_message("cam-7", "deploy-1", 5, {"cam-8": {"online": True}}, "edge")
    assert "no job update for deploy-1 within 5 s" in unknown
    assert "no status ever seen for device cam-7 under topic prefix 'edge'" in unknown
    assert "`fleetctl watch` lists the devices seen" in unknown and "device id" in unknown
    off = silent_device_message("cam-7", "deploy-1", 5, {"cam-7": {"online": False, "ts": "2026-12-01T10:00:00.000Z",
                                                                   "reason": "connection lost"}}, "edge")
    assert "device cam-7 is offline since 2026-12-01T10:00:00.000Z (connection lost)" in off
    on = silent_device_message("cam-7", "deploy-1", 5, {"cam-7": {"online": True, "ts": "T"}}, "edge")
    assert "is online (status at T)" in on and "--timeout" in on
    unwatched = silent_device_message("cam-7", "deploy-1", 5, None, "edge")  # the broker refused the status topics
    assert "is device cam-7 online, and is its id right?" in unwatched and "never" not in unwatched
