"""The attack suite: everything a signed-update client must refuse, against one real daemon.

One daemon (threshold 2 over trusted keys a, b, c) serves ``lin`` v2 for the whole module; each
test sends one attack through the real Mosquitto (or ``agentctl install``), waits for the job's
final update, asserts the refusal and its stable code, and asserts that KServe v2 over HTTP
still answers with v2 and v2's outputs. Scenario ids (C, K, M, D, A, T) match docs/security.md.
"""

from __future__ import annotations

import base64
import gzip
import io
import itertools
import json
import math
import os
import shutil
import stat
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import start_mosquitto
from security.attacklib import (
    Bundles,
    Device,
    Fleet,
    FtpServer,
    HostileServer,
    alter_payload,
    assert_refused,
    endless,
    entry,
    garbage_signature,
    make_pki,
    server_context,
    sha256,
    stall,
    status_route,
    trickle,
)

from agent.bundles import dsse
from agent.bundles.trust import key_id, load_public_pem, public_pem
from fleetctl.bundle import pack_bundle

pytestmark = pytest.mark.filterwarnings("ignore:The asyn:DeprecationWarning")  # pyftpdlib on 3.11
SERVING = 2  # the version the device serves throughout; every attack must leave it serving
BAIT_VERSION = 9  # a valid newer bundle carried by the command attacks: executing one would show
MIN_RATE_BPS = 4096
DEADLINE_BASE_S = 1.5
READ_TIMEOUT_S = 1.0
MAX_ATTEMPTS = 2
BOMB_BYTES = 32 * 1024 * 1024
GIB = 1024**3


@dataclass
class Env:
    dev: Device
    fleet: Fleet
    bundles: Bundles
    www: Path
    http: HostileServer
    https: HostileServer
    https_unknown_ca: HostileServer
    https_wrong_host: HostileServer
    https_expired: HostileServer
    ftp: FtpServer
    bait_url: str
    tmp: Path
    versions: Iterator[int]

    def version(self) -> int:
        """A version above every one tried so far (a refused install may still raise the mark)."""
        return next(self.versions)

    def url(self, rel: str, server: HostileServer | None = None) -> str:
        return (server or self.http).url(f"{rel}/manifest.json")

    def still_serving(self) -> None:
        self.dev.assert_serving(SERVING)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("attacks")
    broker_dir = tmp / "mosquitto"
    broker_dir.mkdir()
    broker = start_mosquitto(broker_dir)
    fleet = Fleet()
    pki = make_pki(tmp / "pki")
    www = tmp / "www"
    www.mkdir()
    bundles = Bundles(www, fleet)
    http = HostileServer(www)
    https = HostileServer(www, server_context(pki.good))
    bad = [HostileServer(www, server_context(c)) for c in (pki.unknown_ca, pki.wrong_host, pki.expired)]
    ftp = FtpServer(www)
    toml = (f'\n[downloads]\nca_file = "{pki.ca}"\nread_timeout_s = {READ_TIMEOUT_S}\n'
            f"min_rate_bps = {MIN_RATE_BPS}\ndeadline_base_s = {DEADLINE_BASE_S}\nmax_attempts = {MAX_ATTEMPTS}\n"
            "\n[storage]\nmax_disk_mb = 1e12\n")
    dev = Device(tmp / "device", broker, fleet, extra_toml=toml)
    try:
        dev.start()
        dev.obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, what="online status")
        done = dev.deploy(http.url(f"{bundles.write(SERVING)}/manifest.json"))
        assert done["state"] == "SUCCEEDED", (done, dev.log_tail())
        dev.expected_serving = bundles.expected_serving
        dev.assert_serving(SERVING)
        bait = http.url(f"{bundles.write(BAIT_VERSION)}/manifest.json")
        yield Env(dev, fleet, bundles, www, http, https, *bad, ftp, bait, tmp, itertools.count(10))
    finally:
        dev.close()
        for s in (http, https, *bad, ftp):
            s.close()
        broker.stop()


def refused_unanswered(env: Env, cid: str, envelope: bytes | str, code: str) -> None:
    """Refused before its signatures checked: no job update under its (unbelieved) id, one more
    in the ``code`` counter, and a signed command right after still works."""
    before = env.dev.refused_counts().get(code, 0)
    env.dev.send_unanswered(cid, envelope)
    assert env.dev.refused_counts().get(code, 0) == before + 1


def only_rejected(env: Env, cid: str, code: str) -> None:
    """The command was answered REJECTED with ``code`` and nothing else happened for it."""
    ups = env.dev.updates(cid)
    assert [u["state"] for u in ups] == ["REJECTED"], ups
    assert ups[0]["error"]["code"] == code


# ================================================================ commands


def test_C01_unsigned_command(env: Env) -> None:
    doc = json.dumps({"v": 1, "id": "c01-unsigned", "type": "deploy", "target": {"device": "dev1"},
                      "issued_at": "2020-01-01T00:00:00Z", "expires_at": "2099-01-01T00:00:00Z",
                      "params": {"model": "lin", "manifest_url": env.bait_url}})
    refused_unanswered(env, "c01-unsigned", doc, "unsigned_command")
    env.still_serving()


def test_C02_signed_by_unknown_keys(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, keys=[env.fleet.x, env.fleet.y])
    refused_unanswered(env, cid, e, "untrusted_key")
    env.still_serving()


def test_C03_payload_altered_after_signing(env: Env) -> None:
    cid, e = env.fleet.command("ping", {})
    e = alter_payload(e, lambda d: d.update(type="deploy", params={"model": "lin", "manifest_url": env.bait_url}))
    refused_unanswered(env, cid, e, "bad_signature")
    env.still_serving()


def test_C04_threshold_not_met(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, keys=[env.fleet.a])
    refused_unanswered(env, cid, e, "threshold_not_met")
    env.still_serving()


def test_C05_one_key_counted_twice(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, keys=[env.fleet.a, env.fleet.a])
    assert len(json.loads(e)["signatures"]) == 2
    refused_unanswered(env, cid, e, "threshold_not_met")
    env.still_serving()


def test_C06_wrong_device(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, target={"device": "dev2"})
    assert_refused(env.dev.run(cid, e), "REJECTED", "wrong_target")
    only_rejected(env, cid, "wrong_target")
    env.still_serving()


def test_C07_wrong_group(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, target={"group": "doors"})
    assert_refused(env.dev.run(cid, e), "REJECTED", "wrong_target")
    only_rejected(env, cid, "wrong_target")
    env.still_serving()


def test_C08_expired(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url},
                               issued_at=time.time() - 7200, ttl_s=3600)
    assert_refused(env.dev.run(cid, e), "REJECTED", "expired")
    only_rejected(env, cid, "expired")
    env.still_serving()


def test_C09_issued_too_far_in_the_future(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, issued_at=time.time() + 3600)
    assert_refused(env.dev.run(cid, e), "REJECTED", "not_yet_valid")
    only_rejected(env, cid, "not_yet_valid")
    env.still_serving()


def test_C10_replayed_envelope(env: Env) -> None:
    cid, e = env.fleet.command("ping", {})
    assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    before = len(env.dev.updates(cid))
    up = env.dev.run(cid, e)
    assert_refused(up, "REJECTED", "replayed")
    assert up["recorded"]["state"] == "SUCCEEDED"
    assert [u["state"] for u in env.dev.updates(cid)[before:]] == ["REJECTED"]  # not executed again
    env.still_serving()


def test_C11_replayed_id_with_another_body(env: Env) -> None:
    cid, e = env.fleet.command("ping", {})
    assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    before = len(env.dev.updates(cid))
    _, e2 = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, cid=cid)
    assert_refused(env.dev.run(cid, e2), "REJECTED", "replayed")
    assert [u["state"] for u in env.dev.updates(cid)[before:]] == ["REJECTED"]
    env.still_serving()


def test_C12_wrong_payload_type(env: Env) -> None:
    doc = json.loads(base64.b64decode(json.loads(env.fleet.command("ping", {})[1])["payload"]))
    payload = json.dumps(doc).encode()
    e = json.dumps(dsse.sign(dsse.MANIFEST_TYPE, payload, env.fleet.ok)).encode()
    refused_unanswered(env, doc["id"], e, "invalid_command")
    env.still_serving()


def test_C13_signature_for_another_payload_type(env: Env) -> None:
    doc = json.loads(base64.b64decode(json.loads(env.fleet.command("ping", {})[1])["payload"]))
    payload = json.dumps(doc).encode()
    env_doc = dsse.sign(dsse.MANIFEST_TYPE, payload, env.fleet.ok)
    env_doc["payloadType"] = dsse.COMMAND_TYPE  # claims to be a command; signed as something else
    refused_unanswered(env, doc["id"], json.dumps(env_doc), "bad_signature")
    env.still_serving()


def test_C14_unknown_major_version(env: Env) -> None:
    cid, e = env.fleet.command("ping", {}, mutate=lambda d: d.update(v=2))
    assert_refused(env.dev.run(cid, e), "REJECTED", "unsupported_version")
    only_rejected(env, cid, "unsupported_version")
    env.still_serving()


def test_C15_unknown_command_type(env: Env) -> None:
    cid, e = env.fleet.command("ping", {}, mutate=lambda d: d.update(type="reboot"))
    assert_refused(env.dev.run(cid, e), "REJECTED", "unknown_command")
    env.still_serving()


def test_C16_valid_for_too_long(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, ttl_s=40 * 86400)
    assert_refused(env.dev.run(cid, e), "REJECTED", "invalid_command", "more than 30 days")
    env.still_serving()


def test_C17_oversized_command(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin", "manifest_url": env.bait_url, "pad": "x" * 300_000})
    refused_unanswered(env, cid, e, "invalid_command")
    env.still_serving()


def test_C18_signed_deploy_without_its_params(env: Env) -> None:
    cid, e = env.fleet.command("deploy", {"model": "lin"})
    assert_refused(env.dev.run(cid, e), "REJECTED", "invalid_command", "manifest_url")
    env.still_serving()


def test_extra_unknown_and_invalid_signatures_do_not_fail_a_command(env: Env) -> None:
    """Not an attack: a command meeting the threshold stays valid with junk signatures beside."""
    f = env.fleet
    cid, e = f.command("ping", {}, keys=[f.x, f.a, f.y, f.b])
    e = garbage_signature(e, f.c)
    assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    env.still_serving()


# ================================================================ keys and rotation


def trust_files(env: Env) -> set[str]:
    """The key ids the trust folder holds."""
    return {key_id(load_public_pem(p.read_bytes())) for p in env.dev.trust_dir.glob("*.pem")}


def test_K01_key_rotation_signed_by_unknown_keys(env: Env) -> None:
    f = env.fleet
    before = trust_files(env)
    cid, e = f.command("trust", {"add": [public_pem(f.x.public_key()).decode()]}, keys=[f.x, f.y])
    refused_unanswered(env, cid, e, "untrusted_key")
    assert trust_files(env) == before
    cid, e = f.command("ping", {}, keys=[f.x, f.y])
    refused_unanswered(env, cid, e, "untrusted_key")
    env.still_serving()


def test_K02_key_rotation_under_the_threshold(env: Env) -> None:
    f = env.fleet
    before = trust_files(env)
    cid, e = f.command("trust", {"add": [public_pem(f.x.public_key()).decode()]}, keys=[f.a, f.x])
    refused_unanswered(env, cid, e, "threshold_not_met")
    assert trust_files(env) == before
    env.still_serving()


def test_K03_rotation_that_would_leave_fewer_keys_than_the_threshold(env: Env) -> None:
    f = env.fleet
    before = trust_files(env)
    cid, e = f.command("trust", {"remove": [key_id(f.a.public_key()), key_id(f.b.public_key())]})
    assert_refused(env.dev.run(cid, e), "REJECTED", "invalid_command", "threshold")
    assert trust_files(env) == before
    env.still_serving()


def test_K04_revoked_key_no_longer_counts(env: Env) -> None:
    """Rotation through the signed ``trust`` command: a new key counts, a removed one does not."""
    f = env.fleet
    d = f.x  # promoted, then revoked
    before = trust_files(env)
    cid, e = f.command("trust", {"add": [public_pem(d.public_key()).decode()]})
    up = env.dev.run(cid, e)
    assert up["state"] == "SUCCEEDED" and key_id(d.public_key()) in up["result"]["keys"], up
    cid, e = f.command("ping", {}, keys=[d, f.c])
    assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    cid, e = f.command("trust", {"remove": [key_id(d.public_key())]}, keys=[f.b, f.c])
    assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    assert trust_files(env) == before
    cid, e = f.command("deploy", {"model": "lin", "manifest_url": env.bait_url}, keys=[d, f.c])
    refused_unanswered(env, cid, e, "threshold_not_met")
    env.still_serving()


# ================================================================ manifests


def deploy(env: Env, rel: str, server: HostileServer | None = None, **params: Any) -> dict[str, Any]:
    return env.dev.deploy(env.url(rel, server), **params)


def test_M01_invalid_signatures(env: Env) -> None:
    f = env.fleet
    rel = env.bundles.write(env.version())
    mpath = env.bundles.folder(rel) / "manifest.json"
    d = json.loads(mpath.read_bytes())
    d["signatures"] = []
    mpath.write_bytes(garbage_signature(garbage_signature(json.dumps(d).encode(), f.a), f.b))
    assert_refused(deploy(env, rel), "REJECTED", "bad_signature")
    env.still_serving()


def test_M02_manifest_altered_after_signing(env: Env) -> None:
    rel = env.bundles.write(env.version())
    mpath = env.bundles.folder(rel) / "manifest.json"
    mpath.write_bytes(alter_payload(mpath.read_bytes(), lambda d: d["validation"].update(atol=1.0)))
    assert_refused(deploy(env, rel), "REJECTED", "bad_signature")
    env.still_serving()


def test_M03_unknown_key(env: Env) -> None:
    rel = env.bundles.write(env.version(), keys=[env.fleet.x, env.fleet.y])
    assert_refused(deploy(env, rel), "REJECTED", "untrusted_key")
    env.still_serving()


def test_M04_threshold_not_met(env: Env) -> None:
    rel = env.bundles.write(env.version(), keys=[env.fleet.b])
    assert_refused(deploy(env, rel), "REJECTED", "threshold_not_met")
    env.still_serving()


def test_M05_one_key_counted_twice(env: Env) -> None:
    rel = env.bundles.write(env.version(), keys=[env.fleet.b, env.fleet.b])
    assert_refused(deploy(env, rel), "REJECTED", "threshold_not_met")
    env.still_serving()


def test_M06_expired_manifest(env: Env) -> None:
    rel = env.bundles.write(env.version(), expires_in_s=-60)
    assert_refused(deploy(env, rel), "REJECTED", "expired")
    env.still_serving()


def test_M07_same_version_as_installed(env: Env) -> None:
    rel = env.bundles.write(SERVING)  # validly signed, re-issued
    assert_refused(deploy(env, rel), "REJECTED", "rollback_refused")
    env.still_serving()


def test_M08_older_version_than_installed(env: Env) -> None:
    rel = env.bundles.write(SERVING - 1)
    assert_refused(deploy(env, rel), "REJECTED", "rollback_refused")
    env.still_serving()


def test_M09_name_mismatch(env: Env) -> None:
    rel = env.bundles.write(env.version(), name="other")
    assert_refused(deploy(env, rel), "REJECTED", "invalid_command", "other")
    env.still_serving()


def test_M10_oversized_manifest(env: Env) -> None:
    pad = {"description": "x" * (1024 * 1024)}
    rel = env.bundles.write(env.version(), mutate=lambda d: d.update(pad))
    assert (env.bundles.folder(rel) / "manifest.json").stat().st_size > 1024 * 1024
    assert_refused(deploy(env, rel), "REJECTED", "invalid_manifest", "1048576")
    env.still_serving()


def test_M11_manifest_not_json(env: Env) -> None:
    rel = env.bundles.write(env.version(), manifest=b"{\"payloadType\": \x00 not json")
    assert_refused(deploy(env, rel), "REJECTED", "invalid_manifest")
    env.still_serving()


def test_M12_signed_manifest_not_the_schema(env: Env) -> None:
    rel = env.bundles.write(env.version(), mutate=lambda d: d.pop("io"))
    assert_refused(deploy(env, rel), "REJECTED", "invalid_manifest", "io")
    env.still_serving()


def test_M13_file_not_listed(env: Env) -> None:
    """The golden samples point at a file the manifest does not list: it is never read."""
    rel = env.bundles.write(env.version(), extra={},
                            mutate=lambda d: d["validation"].update(inputs="samples/unlisted.npz"),
                            serve={"samples/unlisted.npz": env.bundles.inputs})
    assert_refused(deploy(env, rel), "REJECTED", "invalid_manifest", "not listed")
    assert not env.http.hits(f"{rel}/samples/unlisted.npz")
    env.still_serving()


def test_M14_path_escaping_the_bundle(env: Env) -> None:
    evil = entry("../../../etc/passwd", b"root:x:0:0")
    rel = env.bundles.write(env.version(), mutate=lambda d: d["files"].append(evil))
    assert_refused(deploy(env, rel), "REJECTED", "invalid_manifest", "bad path")
    env.still_serving()


def test_M15_file_from_another_version_mixed_in(env: Env) -> None:
    old = env.bundles.labels_of[env.bundles.write(env.version())]
    rel = env.bundles.write(env.version(), serve={"labels.txt": old})  # same size, another version's bytes
    assert_refused(deploy(env, rel), "FAILED", "hash_mismatch", "labels.txt")
    env.still_serving()


def test_M16_file_longer_than_listed(env: Env) -> None:
    rel = env.bundles.write(env.version())
    (env.bundles.folder(rel) / "labels.txt").write_bytes(env.bundles.labels_of[rel] + b"\x00")
    assert_refused(deploy(env, rel), "FAILED", "size_exceeded")
    env.still_serving()


def test_M17_file_shorter_than_listed(env: Env) -> None:
    rel = env.bundles.write(env.version())
    (env.bundles.folder(rel) / "labels.txt").write_bytes(env.bundles.labels_of[rel][:-1])
    assert_refused(deploy(env, rel), "FAILED", "hash_mismatch")
    env.still_serving()


def test_M18_file_altered_same_size(env: Env) -> None:
    rel = env.bundles.write(env.version())
    data = bytearray(env.bundles.labels_of[rel])
    data[len(data) // 2] ^= 0x40
    (env.bundles.folder(rel) / "labels.txt").write_bytes(bytes(data))
    assert_refused(deploy(env, rel), "FAILED", "hash_mismatch", "sha256 mismatch")
    env.still_serving()


def test_M19_manifest_differs_from_the_commands_sha256(env: Env) -> None:
    rel = env.bundles.write(env.version())
    assert_refused(deploy(env, rel, manifest_sha256="0" * 64), "REJECTED", "hash_mismatch")
    env.still_serving()


def test_M20_manifest_with_the_command_payload_type(env: Env) -> None:
    doc = env.bundles.doc(env.version())
    raw = json.dumps(dsse.sign(dsse.COMMAND_TYPE, json.dumps(doc).encode(), env.fleet.ok)).encode()
    rel = env.bundles.write(doc["version"], manifest=raw)
    assert_refused(deploy(env, rel), "REJECTED", "invalid_manifest", "payloadType")
    env.still_serving()


def test_M21_manifest_of_an_unknown_major_version(env: Env) -> None:
    rel = env.bundles.write(env.version(), mutate=lambda d: d.update(v=2))
    assert_refused(deploy(env, rel), "REJECTED", "unsupported_version")
    env.still_serving()


def test_M22_no_variant_runs_on_this_hardware(env: Env) -> None:
    """The bundle is pinned to a backend this device lacks (no CUDA here): nothing can run it."""
    rel = env.bundles.write(env.version())
    up = deploy(env, rel, backend="onnxruntime:CUDAExecutionProvider")
    assert_refused(up, "REJECTED", "no_compatible_backend")
    env.still_serving()


def test_M23_golden_samples_do_not_match(env: Env) -> None:
    import numpy as np

    wrong = io.BytesIO()
    np.savez(wrong, y=np.full((3, 3), 1e3, dtype=np.float32))
    bad = wrong.getvalue()
    rel = env.bundles.write(env.version(), mutate=lambda d: d["files"].__setitem__(2, entry("samples/expected.npz", bad)),
                            serve={"samples/expected.npz": bad})
    assert_refused(deploy(env, rel), "FAILED", "validation_failed")
    env.still_serving()


def test_M24_latency_slo_not_met(env: Env) -> None:
    rel = env.bundles.write(env.version(), mutate=lambda d: d["validation"].update(max_p95_ms=1e-6))
    assert_refused(deploy(env, rel), "FAILED", "slo_failed")
    env.still_serving()


def test_M25_listed_model_that_does_not_load(env: Env) -> None:
    junk = b"\x08\x07not an onnx model" * 8
    rel = env.bundles.write(env.version(), mutate=lambda d: d["variants"][0].update(files=[entry("model.onnx", junk)]),
                            serve={"model.onnx": junk})
    assert_refused(deploy(env, rel), "FAILED", "load_failed")
    env.still_serving()


def test_M26_more_memory_than_the_device_has(env: Env) -> None:
    rel = env.bundles.write(env.version(), mutate=lambda d: d.update(requires={"min_free_memory_mb": 10**9}))
    assert_refused(deploy(env, rel), "REJECTED", "insufficient_memory")
    env.still_serving()


def test_M27_junk_signatures_beside_a_valid_threshold_do_not_fail_the_manifest(env: Env) -> None:
    """The manifest (a + b, plus an unknown key and an invalid signature by c) is accepted; the
    deploy then fails only on the file planted with the wrong bytes."""
    f = env.fleet
    rel = env.bundles.write(env.version(), keys=[f.x, f.a, f.b], serve={"labels.txt": env.bundles.labels()})
    mpath = env.bundles.folder(rel) / "manifest.json"
    mpath.write_bytes(garbage_signature(mpath.read_bytes(), f.c))
    up = deploy(env, rel)
    assert_refused(up, "FAILED", "hash_mismatch")
    cid = up["job"]
    steps = [u.get("step") for u in env.dev.updates(cid) if u["state"] == "IN_PROGRESS"]
    assert "selecting_backend" in steps and "downloading" in steps
    env.still_serving()


def test_M28_a_path_listed_as_a_file_and_as_a_folder(env: Env) -> None:
    """``x`` and ``x/y`` cannot both exist on disk: refused at manifest validation, naming both
    (it once failed ``internal: FileExistsError`` while downloading)."""
    rel = env.bundles.write(env.version(), extra={"x": b"a file", "x/y": b"inside it"}, serve={"x/y": None})
    up = deploy(env, rel)
    assert_refused(up, "REJECTED", "invalid_manifest", "'x'")
    assert "'x/y'" in up["error"]["message"], up
    assert "downloading" not in [u.get("step") for u in env.dev.updates(up["job"])]
    env.still_serving()


# ================================================================ downloads


def test_D01_trickling_server_is_cut_off_by_the_deadline(env: Env) -> None:
    blob = os.urandom(MIN_RATE_BPS)  # deadline: 1.5 s + 4096 B / 4096 B/s = 2.5 s
    rel = env.bundles.write(env.version(), extra={"blob.bin": blob})
    env.http.routes[f"/{rel}/blob.bin"] = trickle(env.http, len(blob), 0.1)
    t0 = time.monotonic()
    up = deploy(env, rel)
    took = time.monotonic() - t0
    assert_refused(up, "FAILED", "download_failed", "deadline")
    assert took < DEADLINE_BASE_S + 1.0 + 5.0, f"took {took:.1f} s"
    env.still_serving()


def test_D02_stalled_server_hits_the_read_timeout(env: Env) -> None:
    blob = os.urandom(64 * MIN_RATE_BPS)  # a 17.5 s deadline: the per-read timeout acts first
    rel = env.bundles.write(env.version(), extra={"blob.bin": blob})
    env.http.routes[f"/{rel}/blob.bin"] = stall(env.http, len(blob))
    t0 = time.monotonic()
    up = deploy(env, rel)
    took = time.monotonic() - t0
    assert_refused(up, "FAILED", "download_failed", f"gave up after {MAX_ATTEMPTS} attempts")
    assert "timed out" in up["error"]["message"].lower()
    assert len(env.http.hits(f"{rel}/blob.bin")) == MAX_ATTEMPTS
    assert took < 10.0, f"took {took:.1f} s"
    env.still_serving()


def test_D03_endless_body_stops_at_size_plus_one(env: Env) -> None:
    rel = env.bundles.write(env.version())
    sent: list[int] = []
    env.http.routes[f"/{rel}/labels.txt"] = endless(env.http, sent)
    t0 = time.monotonic()
    assert_refused(deploy(env, rel), "FAILED", "size_exceeded")
    assert time.monotonic() - t0 < 10.0
    assert len(env.http.hits(f"{rel}/labels.txt")) == 1  # a content error is not retried
    env.still_serving()


@pytest.mark.parametrize(("sid", "which"), [("D04", "https_unknown_ca"), ("D05", "https_wrong_host"),
                                            ("D06", "https_expired")])
def test_D04_D05_D06_tls_that_does_not_verify(env: Env, sid: str, which: str) -> None:
    server: HostileServer = getattr(env, which)
    rel = env.bundles.write(env.version())
    up = deploy(env, rel, server)
    assert_refused(up, "REJECTED", "download_failed", "TLS verification failed")
    assert not server.hits(f"{rel}/manifest.json")  # the handshake failed: no request was sent
    env.still_serving()


def test_D07_https_redirect_to_http(env: Env) -> None:
    rel = env.bundles.write(env.version())
    env.https.routes[f"/{rel}/manifest.json"] = status_route(302, {"Location": env.url(rel)})
    assert_refused(deploy(env, rel, env.https), "REJECTED", "download_failed", "leaves https")
    assert not env.http.hits(f"{rel}/manifest.json")
    env.still_serving()


def test_D08_unsupported_url_scheme(env: Env) -> None:
    up = env.dev.deploy(f"gopher://127.0.0.1:{env.http.port}/x/manifest.json")
    assert_refused(up, "REJECTED", "invalid_command", "scheme")
    env.still_serving()


def test_D09_server_errors_are_retried_a_bounded_number_of_times(env: Env) -> None:
    rel = env.bundles.write(env.version())
    env.http.routes[f"/{rel}/manifest.json"] = status_route(503)
    assert_refused(deploy(env, rel), "REJECTED", "download_failed", f"gave up after {MAX_ATTEMPTS} attempts")
    assert len(env.http.hits(f"{rel}/manifest.json")) == MAX_ATTEMPTS
    env.still_serving()


def test_D10_missing_manifest(env: Env) -> None:
    up = deploy(env, "nowhere")
    assert_refused(up, "REJECTED", "download_failed", "404")
    assert len(env.http.hits("nowhere/manifest.json")) == 1  # a 404 is not retried
    env.still_serving()


def test_D11_redirect_loop(env: Env) -> None:
    env.http.routes["/loop/manifest.json"] = status_route(302, {"Location": "/loop/manifest.json"})
    assert_refused(deploy(env, "loop"), "REJECTED", "download_failed", "redirects")
    assert len(env.http.hits("loop/manifest.json")) <= 6
    env.still_serving()


def test_D12_file_source_that_never_ends(env: Env) -> None:
    rel = env.bundles.write(env.version(), serve={"labels.txt": None})
    (env.bundles.folder(rel) / "labels.txt").symlink_to("/dev/zero")
    up = env.dev.deploy((env.bundles.folder(rel) / "manifest.json").as_uri())
    assert_refused(up, "FAILED", "download_failed", "not a regular file")
    env.still_serving()


def test_D13_file_source_that_is_a_fifo(env: Env) -> None:
    rel = env.bundles.write(env.version(), serve={"labels.txt": None})
    os.mkfifo(env.bundles.folder(rel) / "labels.txt")
    up = env.dev.deploy((env.bundles.folder(rel) / "manifest.json").as_uri(), timeout_s=15)
    assert_refused(up, "FAILED", "download_failed", "not a regular file")
    env.still_serving()


def test_D14_not_enough_free_disk(env: Env) -> None:
    free = shutil.disk_usage(env.dev.store).free
    per_file = 60 * GIB
    n = math.ceil((free + GIB) / per_file)
    huge = [{"path": f"huge-{i}.bin", "size": per_file, "sha256": sha256(str(i).encode())} for i in range(n)]
    rel = env.bundles.write(env.version(), mutate=lambda d: d["files"].extend(huge))
    assert_refused(deploy(env, rel), "FAILED", "disk_full", "free")
    assert not any(p.startswith(f"/{rel}/huge") for p, _ in env.http.requests)  # checked before any byte
    env.still_serving()


def test_D15_store_budget_exceeded(env: Env) -> None:
    f = env.fleet
    cid, e = f.command("config", {"set": {"storage.max_disk_mb": 0.001}})
    assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    try:
        rel = env.bundles.write(env.version(), extra={"blob.bin": os.urandom(4096)})
        assert_refused(deploy(env, rel), "FAILED", "disk_full", "storage.max_disk_mb")
    finally:
        cid, e = f.command("config", {"set": {"storage.max_disk_mb": 1e12}})
        assert env.dev.run(cid, e)["state"] == "SUCCEEDED"
    env.still_serving()


def test_D16_ftp_source_with_an_altered_file(env: Env) -> None:
    rel = env.bundles.write(env.version(), serve={"labels.txt": env.bundles.labels()})
    up = env.dev.deploy(env.ftp.url(f"{rel}/manifest.json"))
    assert_refused(up, "FAILED", "hash_mismatch", "labels.txt")
    env.still_serving()


# ================================================================ offline archives (agentctl install)


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None


def tar_bytes(members: list[Member], gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = m.type
            ti.linkname = m.linkname
            ti.mode = 0o644
            if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = 1, 3  # /dev/null
            ti.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(m.data) if m.type == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def bundle_members(env: Env, rel: str) -> list[Member]:
    folder = env.bundles.folder(rel)
    names = ["manifest.json", "model.onnx", "samples/input.npz", "samples/expected.npz", "labels.txt"]
    return [Member(n, (folder / n).read_bytes()) for n in names]


def install(env: Env, name: str, data: bytes) -> tuple[str, str, dict[str, Any]]:
    """``agentctl install`` a crafted archive; returns (state, code, reply) and checks the store."""
    path = env.tmp / "archives" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    objects_before, _ = env.dev.store_snapshot()
    rc, doc = env.dev.install(path)
    assert rc == 1, doc
    objects_after, partial_after = env.dev.store_snapshot()
    assert objects_after == objects_before and not partial_after, "a refused archive left files in the store"
    if "state" in doc:
        return doc["state"], (doc.get("error") or {}).get("code", ""), doc
    return "ERROR", doc.get("error", {}).get("code", ""), doc


def escape_target(env: Env) -> Path:
    return Path("/tmp") / f"edge-attack-{uuid.uuid4().hex}"


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_A01_absolute_path_member(env: Env, gz: bool) -> None:
    target = escape_target(env)
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms.insert(1, Member(str(target), b"owned"))
    state, code, doc = install(env, "a01.tar" + (".gz" if gz else ""), tar_bytes(ms, gz))
    assert (state, code) == ("FAILED", "invalid_bundle") and "absolute path" in json.dumps(doc)
    assert not target.exists()
    env.still_serving()


def test_A02_dotdot_member(env: Env) -> None:
    name = f"edge-attack-{uuid.uuid4().hex}"
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms.insert(2, Member("samples/../../../../../../../tmp/" + name, b"owned"))
    state, code, doc = install(env, "a02.tar.gz", tar_bytes(ms, True))
    assert (state, code) == ("FAILED", "invalid_bundle") and "'..'" in json.dumps(doc)
    assert not (Path("/tmp") / name).exists()
    env.still_serving()


@pytest.mark.parametrize(("sid", "member", "kind"), [
    ("A03", Member("model.onnx", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink"),
    ("A04", Member("model.onnx", type=tarfile.LNKTYPE, linkname="manifest.json"), "hardlink"),
    ("A05", Member("samples/input.npz", type=tarfile.CHRTYPE), "device"),
    ("A06", Member("samples/input.npz", type=tarfile.FIFOTYPE), "fifo"),
], ids=["A03-symlink", "A04-hardlink", "A05-device", "A06-fifo"])
def test_A03_A06_links_devices_and_fifos(env: Env, sid: str, member: Member, kind: str) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms = [m for m in ms if m.name != member.name] + [member]
    state, code, doc = install(env, f"{sid}.tar.gz", tar_bytes(ms, True))
    assert (state, code) == ("FAILED", "invalid_bundle"), doc
    assert f"is a {kind}" in json.dumps(doc)
    env.still_serving()


def test_A07_member_not_in_the_manifest(env: Env) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms.append(Member("run-me.sh", b"#!/bin/sh\necho owned\n"))
    state, code, doc = install(env, "a07.tar", tar_bytes(ms, False))
    assert (state, code) == ("FAILED", "invalid_bundle") and "not listed" in json.dumps(doc)
    env.still_serving()


def test_A08_tar_gz_bomb_stops_at_the_declared_sizes(env: Env) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms[1] = Member("model.onnx", b"\x00" * BOMB_BYTES)
    data = tar_bytes(ms, True)
    assert len(data) < BOMB_BYTES // 100
    t0 = time.monotonic()
    state, code, doc = install(env, "a08.tar.gz", data)
    assert (state, code) == ("FAILED", "invalid_bundle") and "not expanded" in json.dumps(doc)
    assert time.monotonic() - t0 < 10.0
    env.still_serving()


def test_A09_zip_bomb_stops_at_the_declared_sizes(env: Env) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in ms:
            zf.writestr(m.name, b"\x00" * BOMB_BYTES if m.name == "model.onnx" else m.data)
    assert len(buf.getvalue()) < BOMB_BYTES // 100
    state, code, doc = install(env, "a09.zip", buf.getvalue())
    assert (state, code) == ("FAILED", "invalid_bundle") and "not expanded" in json.dumps(doc)
    env.still_serving()


def test_A10_pax_header_bomb(env: Env) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    good = tar_bytes(ms[:1], False)
    end = good.rstrip(b"\x00")
    end += b"\x00" * (-len(end) % 512)
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = tarfile.XHDTYPE
    ti.size = 2**30  # one extended header claiming a GiB
    data = gzip.compress(end + ti.tobuf(tarfile.USTAR_FORMAT) + b"0" * 65536 * 4, compresslevel=1)
    state, code, doc = install(env, "a10.tar.gz", data)
    assert (state, code) == ("FAILED", "invalid_bundle") and "extended (PAX or long-name) header" in json.dumps(doc)
    env.still_serving()


def test_A11_member_repeated_with_another_versions_bytes(env: Env) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms.append(Member("model.onnx", env.bundles.other_model))  # tar would let the last one win
    state, code, doc = install(env, "a11.tar.gz", tar_bytes(ms, True))
    assert (state, code) == ("FAILED", "invalid_bundle") and "twice" in json.dumps(doc)
    env.still_serving()


def test_A12_manifest_not_first(env: Env) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    ms = ms[1:] + ms[:1]
    state, code, doc = install(env, "a12.tar", tar_bytes(ms, False))
    assert (state, code) == ("REJECTED", "invalid_bundle") and "starts with manifest.json" in json.dumps(doc)
    env.still_serving()


def test_A13_file_from_another_version_in_a_zip(env: Env) -> None:
    rel = env.bundles.write(env.version(), serve={"model.onnx": env.bundles.other_model})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in bundle_members(env, rel):
            zf.writestr(m.name, m.data)
    state, code, _ = install(env, "a13.zip", buf.getvalue())
    assert (state, code) == ("FAILED", "hash_mismatch")
    env.still_serving()


@pytest.mark.parametrize(("sid", "name", "mode", "why"), [
    ("A14", "model.onnx", stat.S_IFLNK | 0o777, "is a symlink"),
    ("A15", "samples/../../evil.npz", stat.S_IFREG | 0o644, "'..'"),
    ("A16", "/tmp/edge-attack-zip", stat.S_IFREG | 0o644, "absolute path"),
], ids=["A14-zip-symlink", "A15-zip-dotdot", "A16-zip-absolute"])
def test_A14_A16_hostile_zip_members(env: Env, sid: str, name: str, mode: int, why: str) -> None:
    ms = bundle_members(env, env.bundles.write(env.version()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in ms:
            if m.name == name:
                continue
            zf.writestr(m.name, m.data)
        zi = zipfile.ZipInfo(name)
        zi.create_system = 3
        zi.external_attr = mode << 16
        zf.writestr(zi, "/etc/passwd" if stat.S_ISLNK(mode) else "owned")
    state, code, doc = install(env, f"{sid}.zip", buf.getvalue())
    assert (state, code) == ("FAILED", "invalid_bundle") and why in json.dumps(doc), doc
    assert not Path("/tmp/edge-attack-zip").exists()
    env.still_serving()


def test_A17_archive_signed_by_an_unknown_key(env: Env) -> None:
    rel = env.bundles.write(env.version(), keys=[env.fleet.x, env.fleet.y])
    out = pack_bundle(env.bundles.folder(rel), env.tmp / "archives" / "a17.tar.gz")
    state, code, _ = install(env, "a17.tar.gz", out.read_bytes())
    assert (state, code) == ("REJECTED", "untrusted_key")
    env.still_serving()


def test_A18_not_an_archive(env: Env) -> None:
    state, code, _ = install(env, "a18.zip", b"MZ\x90\x00 this is not a bundle" * 100)
    assert (state, code) == ("ERROR", "invalid_bundle")
    env.still_serving()


def test_agentctl_verify_refuses_what_install_refuses(env: Env) -> None:
    """Not a separate attack: the offline verifier (no daemon) agrees with install."""
    rel = env.bundles.write(env.version())
    good = pack_bundle(env.bundles.folder(rel), env.tmp / "archives" / "verify-ok.zip")
    trust = env.dev.trust_dir
    r = env.dev.agentctl("verify", str(good), "--trust", str(trust), "--threshold", "2")
    assert r.returncode == 0 and "OK lin" in r.stdout, r.stderr
    r = env.dev.agentctl("verify", str(good), "--trust", str(trust), "--threshold", "3")
    assert r.returncode == 1 and "threshold_not_met" in r.stderr
    bad = env.tmp / "archives" / "a07.tar"
    r = env.dev.agentctl("verify", str(bad), "--trust", str(trust), "--threshold", "2")
    assert r.returncode == 1 and "invalid_bundle" in r.stderr
    env.still_serving()


# ================================================================ clock


def test_T01_device_clock_earlier_than_the_last_trusted_time(env: Env) -> None:
    dev = env.dev
    recorded = time.time() + 86400  # as if a manifest from tomorrow had been trusted, then the clock fell back
    dev.set_kv("last_trusted_time", recorded)
    try:
        rel = env.bundles.write(env.version())
        assert_refused(deploy(env, rel), "REJECTED", "clock_untrusted", "earlier than the last trusted time")
        st = dev.obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("clock") == "untrusted", what="status with clock")
        assert "NTP" in st["clock_reason"]
        env.still_serving()
    finally:
        dev.set_kv("last_trusted_time", time.time() - 3600)
    # Once the clock is plausible again, the next verified manifest clears the flag.
    seen = {id(d) for d in dev.obs.find(lambda t, d: t == "edge/dev1/status")}
    rel = env.bundles.write(env.version(), serve={"labels.txt": env.bundles.labels()})
    assert_refused(deploy(env, rel), "FAILED", "hash_mismatch")
    dev.obs.wait(lambda t, d: t == "edge/dev1/status" and id(d) not in seen and "clock" not in d, what="status without clock")
    env.still_serving()
