"""Encrypted bundles against one real daemon (docs/security.md "Confidential models").

One daemon (process isolation, the default) with an age identity in ``trust.decryption_keys``
serves ``lin`` from an encrypted bundle; every refusal is sent through the real Mosquitto and
asserted by its stable code with the serving version unchanged; rotation, a swap and a rollback
run for real; then the device's folders, its temporary folder and /dev/shm are scanned for the
model's plaintext. Bundles are sealed with the fleet's own code (fleetctl/sealing.py, pyrage).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from agentproc import AgentProcess
from conftest import make_linear_onnx, start_mosquitto
from integration.opskit import agentctl, fleetctl
from security.attacklib import X_IN, Bundles, Device, Fleet, HostileServer, assert_refused, npz

from agent.bundles.manifest import sign_manifest
from agent.deploy.offline import installed
from fleetctl.bundle import manifest_document, pack_bundle
from fleetctl.sealing import generate_identity, reencrypt_bundle, seal_document

SERVING = 2
PROBATION_S = 0.3
SHM = Path("/dev/shm")
SCAN_MAX_FILE_BYTES = 256 * 1024 * 1024  # larger files are not model copies (and not read whole)


class SealedBundles(Bundles):
    """Bundles with a model of their own (seeded per run): its weight bytes are the byte run the
    plaintext scan looks for, found nowhere else on this machine."""

    def __init__(self, root: Path, fleet: Fleet, seed: int) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        self.root, self.fleet, self._n = root, fleet, 0
        self.labels_of: dict[str, bytes] = {}
        path = make_linear_onnx(root.parent / f"{root.name}-models" / "m.onnx", seed=seed)
        self.model = path.read_bytes()
        weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        self.secret = weights["W"].tobytes()  # 48 bytes of float32 weights, as the file stores them
        assert self.secret in self.model
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
        self.expected_serving = sess.run(["y"], {"x": X_IN})[0]
        self.inputs = npz(x=x)
        self.expected = npz(y=sess.run(["y"], {"x": x})[0])


@dataclass
class Env:
    dev: Device
    fleet: Fleet
    bundles: SealedBundles
    http: HostileServer
    mine: str  # this device's recipient
    other: str  # another device's recipient
    device_key: Path
    device_tmp: Path
    tmp: Path
    versions: Iterator[int]
    serving_rel: str = ""  # the folder of the bundle that serves SERVING
    first: dict[str, Any] | None = None  # the final update of its deploy

    def version(self) -> int:
        return next(self.versions)

    def sealed(self, version: int, recipients: list[str] | None = None,
               change: Callable[[dict[str, Any], Path], None] | None = None) -> str:
        """A bundle whose model file is encrypted (by fleetctl's own code) to ``recipients``
        (default: this device); ``change`` edits the document (and folder) before signing."""
        rel = self.bundles.write(version)
        folder = self.bundles.folder(rel)
        doc = seal_document(folder, manifest_document(folder / "manifest.json"), recipients or [self.mine])
        if change is not None:
            change(doc, folder)
        (folder / "manifest.json").write_bytes(sign_manifest(doc, self.fleet.ok))
        return rel

    def url(self, rel: str) -> str:
        return self.http.url(f"{rel}/manifest.json")

    def still_serving(self, version: int = SERVING) -> None:
        self.dev.assert_serving(version)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("sealed")
    (tmp / "mosquitto").mkdir()
    broker = start_mosquitto(tmp / "mosquitto")
    fleet = Fleet()
    www = tmp / "www"
    www.mkdir()
    bundles = SealedBundles(www, fleet, seed=int.from_bytes(os.urandom(4), "little"))
    http = HostileServer(www)
    mine = generate_identity(tmp / "device-keys", "dev1")
    other = generate_identity(tmp / "fleet-keys", "dev2")
    device_tmp = tmp / "device-tmp"
    device_tmp.mkdir()
    dev = Device(tmp / "device", broker, fleet, extra_toml=f"\n[deploy]\nprobation_s = {PROBATION_S}\n")
    text = dev.proc.config.read_text()
    dev.proc.config.write_text(text.replace("threshold = 2\n",
                                            f'threshold = 2\ndecryption_keys = ["{mine.identity_path}"]\n'))
    dev.proc.env["TMPDIR"] = str(device_tmp)  # the daemon's and its workers' temporary folder, scanned below
    try:
        dev.start()
        dev.obs.wait(lambda t, d: t == "edge/dev1/status" and d.get("online") is True, what="online status")
        dev.expected_serving = bundles.expected_serving
        e = Env(dev, fleet, bundles, http, mine.recipient, other.recipient, mine.identity_path,
                device_tmp, tmp, itertools.count(10))
        e.serving_rel = e.sealed(SERVING)
        e.first = dev.deploy(e.url(e.serving_rel))  # every scenario starts from an encrypted v2 serving
        yield e
    finally:
        dev.close()
        http.close()
        broker.stop()


def test_encrypted_bundle_deploys_validates_and_serves(env: Env) -> None:
    done = env.first
    assert done is not None and done["state"] == "SUCCEEDED", (done, env.dev.log_tail())
    assert "max_abs_error" in done["result"]["figures"]["validation"], done["result"]["figures"]  # golden check ran
    env.still_serving()
    # The store keeps the ciphertext: the model file's object is named by the ciphertext's hash.
    folder = env.bundles.folder(env.serving_rel)
    doc = manifest_document(folder / "manifest.json")
    model = next(f for f in doc["variants"][0]["files"] if f["path"] == "model.onnx")
    obj = env.dev.store / "objects" / model["sha256"][:2] / model["sha256"]
    assert obj.read_bytes() == (folder / "model.onnx").read_bytes()
    assert env.bundles.secret not in obj.read_bytes()
    # The worker holding the plaintext writes no core file; the daemon itself is untouched.
    workers = [p for p in psutil.Process(env.dev.proc.proc.pid).children() if "agent.serving.worker" in " ".join(p.cmdline())]
    assert workers, "no worker process"
    assert all(w.rlimit(psutil.RLIMIT_CORE) == (0, 0) for w in workers)  # hard limit 0: set by the worker
    assert psutil.Process(env.dev.proc.proc.pid).rlimit(psutil.RLIMIT_CORE) == resource.getrlimit(resource.RLIMIT_CORE)


def test_not_a_recipient_is_refused_before_download(env: Env) -> None:
    before = env.dev.store_snapshot()
    done = env.dev.deploy(env.url(env.sealed(env.version(), [env.other])))
    assert_refused(done, "REJECTED", "not_a_recipient", env.mine)  # the message names this device's recipient
    assert env.dev.store_snapshot() == before  # nothing was downloaded
    env.still_serving()


def test_listed_recipient_that_cannot_open_the_file_is_refused(env: Env) -> None:
    """The manifest lists this device, but the file was encrypted to another one only."""
    def reseal(doc: dict[str, Any], folder: Path) -> None:
        (folder / "model.onnx").write_bytes(env.bundles.model)
        entry = seal_document(folder, {"variants": [{"files": [{"path": "model.onnx"}]}]}, [env.other])
        doc["variants"][0]["files"][0] = entry["variants"][0]["files"][0]
        doc["recipients"] = [env.mine, env.other]

    done = env.dev.deploy(env.url(env.sealed(env.version(), change=reseal)))
    assert_refused(done, "FAILED", "not_a_recipient", env.mine)
    env.still_serving()


def test_altered_ciphertext_is_refused_before_decryption(env: Env) -> None:
    rel = env.sealed(env.version())
    model = env.bundles.folder(rel) / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x01  # inside the last ChaCha20-Poly1305 chunk
    model.write_bytes(bytes(data))
    done = env.dev.deploy(env.url(rel))
    assert_refused(done, "FAILED", "hash_mismatch", "model.onnx")
    env.still_serving()


def test_plaintext_hash_mismatch_is_refused(env: Env) -> None:
    def wrong_plaintext(doc: dict[str, Any], _folder: Path) -> None:
        doc["variants"][0]["files"][0]["encryption"]["plaintext_sha256"] = "0" * 64

    done = env.dev.deploy(env.url(env.sealed(env.version(), change=wrong_plaintext)))
    assert_refused(done, "FAILED", "decrypt_mismatch", "model.onnx")
    env.still_serving()


def test_unknown_encryption_format_is_refused(env: Env) -> None:
    def age_v2(doc: dict[str, Any], _folder: Path) -> None:
        doc["variants"][0]["files"][0]["encryption"]["format"] = "age-v2"

    before = env.dev.store_snapshot()
    done = env.dev.deploy(env.url(env.sealed(env.version(), change=age_v2)))
    assert_refused(done, "REJECTED", "unsupported_encryption", "age-v2")
    assert env.dev.store_snapshot() == before
    env.still_serving()


def test_unsafe_identity_is_refused_at_deploy_and_at_start(env: Env) -> None:
    key = env.device_key
    os.chmod(key, 0o644)
    try:
        done = env.dev.deploy(env.url(env.sealed(env.version())))
        assert_refused(done, "REJECTED", "no_decryption_key", f"chmod 0600 {key}")
        env.still_serving()
        # A second agent with the same unsafe identity refuses to start, saying how to fix it.
        other = AgentProcess(env.tmp / "unsafe", env.dev.broker.url)
        other.write_config()
        other.config.write_text(other.config.read_text().replace(
            'keys_dir = "trust"\n', f'keys_dir = "trust"\ndecryption_keys = ["{key}"]\n'))
        r = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(other.config)],
                           capture_output=True, text=True, timeout=30)
        said = r.stdout + r.stderr
        assert r.returncode == 3, said[-2000:]
        assert "no_decryption_key" in said and f"chmod 0600 {key}" in said, said[-2000:]
        check = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(other.config)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 2 and f"chmod 0600 {key}" in check.stderr, check.stderr[-2000:]
    finally:
        os.chmod(key, 0o600)


def test_rotation_swap_rollback_restart_leave_no_plaintext(env: Env) -> None:
    src = env.bundles.folder(env.serving_rel)  # the serving v2, encrypted to this device
    out_dir = env.bundles.root
    # Rotation away from this device: a new version it cannot open; it keeps serving.
    v_gone = env.version()
    reencrypt_bundle(src, out_dir / f"r{v_gone}", v_gone, env.fleet.ok, [str(env.device_key)], [env.other],
                     expires_in_s=3600)
    done = env.dev.deploy(env.url(f"r{v_gone}"))
    assert_refused(done, "REJECTED", "not_a_recipient", env.mine)
    env.still_serving()
    # Rotation to a set with this device: same plaintext, new ciphertext, swapped in (probation).
    v_new = env.version()
    reencrypt_bundle(src, out_dir / f"r{v_new}", v_new, env.fleet.ok, [str(env.device_key)], [env.other, env.mine],
                     expires_in_s=3600)
    assert (out_dir / f"r{v_new}" / "model.onnx").read_bytes() != (src / "model.onnx").read_bytes()
    done = env.dev.deploy(env.url(f"r{v_new}"))
    assert done["state"] == "SUCCEEDED", (done, env.dev.log_tail())
    env.still_serving(v_new)
    cid, cmd = env.fleet.command("rollback", {"model": "lin", "to_version": SERVING})
    done = env.dev.run(cid, cmd)
    assert done["state"] == "SUCCEEDED", (done, env.dev.log_tail())
    env.still_serving()
    env.dev.restart()  # the restore after a restart decrypts through the same step
    env.still_serving()
    # The model's weights appear in no file the device wrote: state, store, cache, logs, its
    # temporary folder, and /dev/shm.
    found = _scan([env.dev.root, env.device_tmp, SHM], env.bundles.secret)
    assert not found, f"plaintext model bytes in {found}"
    assert _scan([env.bundles.root.parent / f"{env.bundles.root.name}-models"], env.bundles.secret)  # the scan finds a copy


def _scan(roots: list[Path], needle: bytes) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                try:
                    if not p.is_file() or p.is_symlink() or p.stat().st_size > SCAN_MAX_FILE_BYTES:
                        continue
                    if needle in p.read_bytes():
                        hits.append(str(p))
                except OSError:  # gone meanwhile, or another user's private file in /dev/shm
                    continue
    return hits


def test_offline_install_of_an_encrypted_bundle(env: Env) -> None:
    """``agentctl verify`` checks the recipient; ``agentctl install`` deploys the archive (last:
    the new version serves from here on)."""
    version = env.version()
    rel = env.sealed(version)
    archive = env.tmp / f"lin-{version}.tar.gz"
    pack_bundle(env.bundles.folder(rel), archive)
    r = env.dev.agentctl("verify", str(archive), "--trust", str(env.dev.trust_dir), "--threshold", "2",
                         "--identity", str(env.device_key), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["encryption"]["recipients"] == [env.mine]
    code, job = env.dev.install(archive)
    assert code == 0 and installed(job), job  # serving (on probation, or done)
    env.still_serving(version)


def test_fleetctl_and_agentctl_with_the_age_cli(tmp_path: Path) -> None:
    """keygen --age, build --encrypt-to (a recipient file), then: the `age` CLI opens a model file
    to the manifest's plaintext hash; agentctl verify accepts the bundle for its recipient and
    refuses it (not_a_recipient) for another identity."""
    age = shutil.which("age")
    if age is None:
        pytest.fail("the age command-line tool is not installed (apt-get install age; tools/test.sh checks for it)")
    model = make_linear_onnx(tmp_path / "m.onnx", seed=3)
    for args in (("keygen", "--out", str(tmp_path / "k"), "--name", "fleet"),
                 ("keygen", "--age", "--out", str(tmp_path / "k"), "--name", "dev1"),
                 ("keygen", "--age", "--out", str(tmp_path / "k"), "--name", "dev2"),
                 ("bundle", "build", str(model), "--name", "lin", "--version", "1", "--key", str(tmp_path / "k" / "fleet.key"),
                  "--out", str(tmp_path / "b"), "--encrypt-to", str(tmp_path / "k" / "dev1.agekey.pub"))):
        r = fleetctl(*args)
        assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "k" / "dev1.agekey").stat().st_mode) == 0o600
    doc = manifest_document(tmp_path / "b" / "manifest.json")
    entry = doc["variants"][0]["files"][0]
    assert entry["encryption"]["format"] == "age-v1" and doc["recipients"] == [
        (tmp_path / "k" / "dev1.agekey.pub").read_text().strip()]
    ciphertext = (tmp_path / "b" / entry["path"]).read_bytes()
    assert hashlib.sha256(ciphertext).hexdigest() == entry["sha256"] and model.read_bytes() not in ciphertext
    plain = subprocess.run([age, "-d", "-i", str(tmp_path / "k" / "dev1.agekey"), str(tmp_path / "b" / entry["path"])],
                           capture_output=True, timeout=30, check=True).stdout
    assert hashlib.sha256(plain).hexdigest() == entry["encryption"]["plaintext_sha256"] == hashlib.sha256(
        model.read_bytes()).hexdigest()
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(tmp_path / "k" / "fleet.pub.pem", trust)
    audit = fleetctl("bundle", "verify", str(tmp_path / "b"), "--trust", str(trust))
    assert audit.returncode == 0 and doc["recipients"][0] in audit.stdout, audit  # who can open it
    ok = agentctl("verify", str(tmp_path / "b"), "--trust", str(trust), "--identity", str(tmp_path / "k" / "dev1.agekey"))
    assert ok.returncode == 0 and "encrypted (age-v1) to 1 recipient(s), this device is one of them" in ok.stdout, ok
    no = agentctl("verify", str(tmp_path / "b"), "--trust", str(trust), "--identity", str(tmp_path / "k" / "dev2.agekey"))
    assert no.returncode != 0 and "not_a_recipient" in no.stderr, no
