"""``edge-agent init --dev DIR``: everything the daemon needs in one folder, for trying it by hand.

Writes, and prints the commands that come next:

- ``DIR/agent.toml``: the broker on loopback, the state folder, trust folder and control socket
  inside DIR, the KServe v2 API on a stated loopback port, short heartbeats and probation so a
  first deploy shows results in seconds. Relative paths in it are relative to the file, so the
  folder can be moved whole.
- ``DIR/keys/fleet.key`` (0600) and ``DIR/keys/fleet.pub.pem``: a fresh fleet signing key pair,
  the private half for ``fleetctl`` (on a real fleet it never goes on a device);
- ``DIR/trust/fleet.pem``: the public half, the one key this device trusts.

Development only: nothing here is what ``tools/install.sh`` sets up on a device. An existing
setup is never overwritten unless ``--force`` is given. The written config is loaded back through
``agent.config`` before anything is printed, so what ``init`` writes is what the daemon accepts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from agent import config, errors
from agent.fsutil import atomic_write

DEFAULT_DEVICE_ID = "dev-device"
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
DEFAULT_API_PORT = 8470
KEY_NAME = "fleet"
PRIVATE_KEY_MODE = 0o600  # created with this mode from the first byte (atomic_write's temp file)
PUBLIC_FILE_MODE = 0o644
TRUST_DIR_MODE = 0o755  # the daemon refuses a trust folder others can write to
DEV_HEARTBEAT_S = 5  # seconds; a device's default is 60
DEV_PROBATION_S = 5  # seconds; a device's default is 60, and `fleetctl deploy --wait` waits it out
EXIT_OK = 0
EXIT_FAILED = 1

CONFIG_TEMPLATE = """\
# Written by `edge-agent init --dev`: a development setup on one machine (docs/configuration.md).
# Relative paths are relative to this file.
device_id = "{device_id}"
groups = ["dev"]
state_dir = "state"

[mqtt]
url = "{broker}"

[trust]
keys_dir = "trust"        # trust/{key}.pem: the public half of keys/{key}.key

[api]
listen = "127.0.0.1:{api_port}"   # KServe v2 and /metrics
control_socket = "control.sock"   # agentctl talks to the daemon here
control_group = ""                # whoever may open the socket (it is mode 0660) may read
admin_group = ""                  # changes: root and the user running the daemon

[telemetry]
heartbeat_s = {heartbeat_s}
window_s = {heartbeat_s}

[deploy]
probation_s = {probation_s}
"""


def add_parser(sub: Any) -> None:
    """The ``init`` subcommand of ``edge-agent`` (argparse subparsers ``sub``)."""
    p = sub.add_parser("init", help="write a development config, trust folder and signing key into one folder")
    p.add_argument("--dev", required=True, metavar="DIR",
                   help="folder to write agent.toml, trust/ and keys/ into (made if missing)")
    p.add_argument("--broker", default=DEFAULT_BROKER_URL, help="mqtt:// URL of the broker (default %(default)s)")
    p.add_argument("--api-port", type=int, default=DEFAULT_API_PORT,
                   help="loopback port of the KServe v2 API (default %(default)s)")
    p.add_argument("--device-id", default=DEFAULT_DEVICE_ID, help="default %(default)s")
    p.add_argument("--force", action="store_true", help="replace an existing setup in DIR (a new key pair too)")


def _key_pair() -> tuple[bytes, bytes, str]:
    """A fresh Ed25519 key pair: (private PKCS#8 PEM, public PEM, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.bundles.trust import key_id, public_pem

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return private, public_pem(key.public_key()), key_id(key.public_key())


def write_dev_setup(folder: Path, *, broker: str = DEFAULT_BROKER_URL, api_port: int = DEFAULT_API_PORT,
                    device_id: str = DEFAULT_DEVICE_ID, force: bool = False) -> config.Config:
    """Write the setup described in the module docstring; returns the config as the daemon reads it.

    ConfigError for a bad broker URL, port or device id (nothing written), or an existing setup
    without ``force``."""
    folder = folder.resolve()
    cfg_path = folder / "agent.toml"
    private_path = folder / "keys" / f"{KEY_NAME}.key"
    existing = [p for p in (cfg_path, private_path) if p.exists()]
    if existing and not force:
        raise errors.ConfigError(f"{existing[0]} already exists; use --force to replace the setup in {folder}")
    if not 1 <= api_port <= 65535:
        raise errors.ConfigError(f"--api-port: {api_port} not in 1..65535")
    text = CONFIG_TEMPLATE.format(device_id=device_id, broker=broker, api_port=api_port, key=KEY_NAME,
                                  heartbeat_s=DEV_HEARTBEAT_S, probation_s=DEV_PROBATION_S)
    config.from_dict(config.tomllib.loads(text), source="init")  # refuse bad values before writing anything
    trust = folder / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    os.chmod(trust, TRUST_DIR_MODE)
    private, public, _ = _key_pair()
    for stale in trust.glob("*.pem") if force else ():
        stale.unlink()  # the replaced key must stop being trusted
    atomic_write(private_path, private, PRIVATE_KEY_MODE)
    atomic_write(folder / "keys" / f"{KEY_NAME}.pub.pem", public, PUBLIC_FILE_MODE)
    atomic_write(trust / f"{KEY_NAME}.pem", public, PUBLIC_FILE_MODE)
    atomic_write(cfg_path, text.encode(), PUBLIC_FILE_MODE)
    return config.load(str(cfg_path))


def _shown(path: Path) -> str:
    """``path`` as the user should type it: ``$PWD/…`` below the current folder, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else f"$PWD/{rel}"


def next_steps(cfg: config.Config, folder: Path) -> list[str]:
    """The commands that come next with this setup (the README's "By hand on one machine")."""
    return [
        f"export EDGE_AGENT_CONFIG={_shown(folder / 'agent.toml')} FLEETCTL_BROKER={cfg.mqtt.url} "
        f"FLEETCTL_KEY={_shown(folder / 'keys' / (KEY_NAME + '.key'))}",
        f"edge-agent run > {_shown(folder / 'agent.log')} 2>&1 &",
        "fleetctl bundle build model.onnx --name mymodel --version 1",
        "fleetctl serve bundles --port 8080 > serve.log 2>&1 &",
        f"fleetctl deploy --device {cfg.device_id} --model mymodel "
        "--manifest-url http://127.0.0.1:8080/mymodel/1/manifest.json --wait",
        f"curl -s -w '\\n' http://{cfg.api.listen}/v2/models/mymodel/infer -H 'Content-Type: application/json' -d @model.request.json",
        "agentctl status",
    ]


def run(args: Any) -> int:
    """``edge-agent init --dev DIR``: write the setup and print where everything went."""
    folder = Path(args.dev)
    try:
        cfg = write_dev_setup(folder, broker=args.broker, api_port=args.api_port, device_id=args.device_id,
                              force=args.force)
    except errors.ConfigError as e:
        print(f"edge-agent: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"edge-agent: {e.filename or folder}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    folder = folder.resolve()
    print(f"wrote {folder / 'agent.toml'}: device {cfg.device_id}, broker {cfg.mqtt.url}, "
          f"KServe v2 on http://{cfg.api.listen}, control socket {cfg.api.control_socket}")
    print(f"wrote {folder / 'keys' / (KEY_NAME + '.key')}: the fleet's private signing key (0600), for fleetctl --key")
    print(f"wrote {folder / 'trust' / (KEY_NAME + '.pem')}: its public half; the device trusts every *.pem in {folder / 'trust'}")
    print("next (a broker must listen on the URL above, e.g. `mosquitto -p PORT`):")
    for line in next_steps(cfg, folder):
        print(f"  {line}")
    return EXIT_OK
