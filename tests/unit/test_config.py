"""agent.toml loading and validation (SURFACE.md "Config")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.config import from_dict, load, set_dotted
from agent.errors import ConfigError


def _err(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        from_dict(data)
    return ei.value.message


def test_defaults_are_valid_and_match_surface() -> None:
    cfg = from_dict({}, source="defaults")
    config.validate(cfg)
    assert cfg.device_id  # the hostname, sanitised
    assert config.NAME_RE.match(cfg.device_id)
    assert cfg.mqtt.topic_prefix == "edge"
    assert cfg.mqtt.keepalive_s == 60
    assert cfg.trust.threshold == 1
    assert cfg.trust.require_signed_commands is True
    assert cfg.trust.max_clock_skew_s == 300
    assert cfg.telemetry.window_s == 60
    assert cfg.api.listen == "127.0.0.1:8470"
    assert cfg.storage.keep_versions == 2
    assert cfg.hardware.profile == "auto"


def test_unknown_top_level_key_names_the_key() -> None:
    msg = _err({"devise_id": "x"})
    assert "devise_id" in msg
    assert "unknown key" in msg


def test_unknown_key_in_section_names_section_and_key() -> None:
    msg = _err({"mqtt": {"keepalive": 30}})
    assert "mqtt.keepalive" in msg
    assert "unknown key" in msg


def test_section_that_is_not_a_table_is_an_error() -> None:
    assert "[trust]" in _err({"trust": 3})


@pytest.mark.parametrize(("data", "key"), [
    ({"mqtt": {"keepalive_s": "60"}}, "mqtt.keepalive_s"),
    ({"mqtt": {"keepalive_s": 60.5}}, "mqtt.keepalive_s"),
    ({"trust": {"threshold": True}}, "trust.threshold"),
    ({"trust": {"require_signed_commands": 1}}, "trust.require_signed_commands"),
    ({"telemetry": {"window_s": "fast"}}, "telemetry.window_s"),
    ({"groups": "cameras"}, "groups"),
    ({"groups": ["ok", 3]}, "groups"),
    ({"backends": {"prefer": "openvino:CPU"}}, "backends.prefer"),
    ({"device_id": 42}, "device_id"),
])
def test_wrong_type_names_the_key(data: dict[str, Any], key: str) -> None:
    assert key in _err(data)


def test_int_accepted_for_float_key() -> None:
    cfg = from_dict({"telemetry": {"window_s": 5}})
    assert cfg.telemetry.window_s == 5.0
    assert isinstance(cfg.telemetry.window_s, float)


def test_fractional_values_accepted_for_float_keys() -> None:
    cfg = from_dict({"telemetry": {"window_s": 0.5, "heartbeat_s": 2.5, "outbox_max_mb": 1.5},
                     "storage": {"max_disk_mb": 512.5}})
    assert (cfg.telemetry.window_s, cfg.telemetry.heartbeat_s) == (0.5, 2.5)
    assert cfg.telemetry.outbox_max_mb == 1.5
    assert cfg.storage.max_disk_mb == 512.5
    set_dotted(cfg, "telemetry.heartbeat_s", 0.25)
    assert cfg.telemetry.heartbeat_s == 0.25


@pytest.mark.parametrize(("data", "key"), [
    ({"mqtt": {"keepalive_s": 4}}, "mqtt.keepalive_s"),
    ({"mqtt": {"keepalive_s": 3601}}, "mqtt.keepalive_s"),
    ({"trust": {"threshold": 0}}, "trust.threshold"),
    ({"trust": {"threshold": 17}}, "trust.threshold"),
    ({"telemetry": {"window_s": 0.01}}, "telemetry.window_s"),
    ({"telemetry": {"window_s": 86401}}, "telemetry.window_s"),
    ({"storage": {"keep_versions": 0}}, "storage.keep_versions"),
    ({"serving": {"max_batch": 65}}, "serving.max_batch"),  # above backends.max_batch (64)
    ({"serving": {"max_batch": -1}}, "serving.max_batch"),
    ({"serving": {"max_queue_delay_us": 1_000_001}}, "serving.max_queue_delay_us"),
    ({"backends": {"autotune_concurrency": 0}}, "backends.autotune_concurrency"),
    ({"backends": {"autotune_concurrency": 65}}, "backends.autotune_concurrency"),
    ({"backends": {"autotune_objective": "fastest"}}, "backends.autotune_objective"),
])
def test_out_of_range_names_the_key(data: dict[str, Any], key: str) -> None:
    assert key in _err(data)


@pytest.mark.parametrize("data", [
    {"mqtt": {"keepalive_s": 5}},
    {"mqtt": {"keepalive_s": 3600}},
    {"trust": {"threshold": 16}},
    {"telemetry": {"window_s": 0.05}},
    {"telemetry": {"window_s": 86400}},
    {"serving": {"max_batch": 64, "max_queue_delay_us": 1_000_000}},
    {"backends": {"autotune_concurrency": 1, "autotune_objective": "throughput"}},
    {"backends": {"autotune_concurrency": 64, "autotune_objective": "latency"}},
])
def test_range_bounds_are_inclusive(data: dict[str, Any]) -> None:
    cfg = from_dict(data)
    (section, values), = data.items()
    for k, v in values.items():
        assert getattr(getattr(cfg, section), k) == v


@pytest.mark.parametrize("url", ["http://broker:1883", "tcp://broker", "mqtt://", "broker:1883",
                                 "mqtt://broker:notaport"])
def test_mqtt_url_scheme_and_host_checked(url: str) -> None:
    assert "mqtt.url" in _err({"mqtt": {"url": url}})


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "mqtts://broker.example:8883", "mqtts://broker"])
def test_mqtt_url_accepted(url: str) -> None:
    assert from_dict({"mqtt": {"url": url}}).mqtt.url == url


def test_bad_device_id_and_group_named() -> None:
    assert "device_id" in _err({"device_id": "a/b"})
    assert "groups" in _err({"groups": ["ok", "bad+group"]})


def test_load_resolves_relative_paths_against_the_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    f = folder / "agent.toml"
    f.write_text(
        'device_id = "pi-1"\n'
        'state_dir = "state"\n'
        "[trust]\nkeys_dir = \"trust\"\n"
        "[mqtt]\nca_file = \"tls/ca.pem\"\ncert_file = \"/abs/cert.pem\"\n"
        "[hardware]\nprofiles_dirs = [\"profiles\", \"/usr/share/x\"]\n"
    )
    cfg = load(str(f))
    base = folder.resolve()
    assert cfg.source == str(f)
    assert cfg.device_id == "pi-1"
    assert cfg.state_dir == str(base / "state")
    assert cfg.trust.keys_dir == str(base / "trust")
    assert cfg.mqtt.ca_file == str(base / "tls" / "ca.pem")
    assert cfg.mqtt.cert_file == "/abs/cert.pem"  # absolute paths untouched
    assert cfg.mqtt.key_file == ""  # empty stays empty
    assert cfg.hardware.profiles_dirs == [str(base / "profiles"), "/usr/share/x"]


def test_load_error_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("[storage]\nkeep_versions = 99\n")
    with pytest.raises(ConfigError) as ei:
        load(str(f))
    assert str(f) in ei.value.message
    assert "storage.keep_versions" in ei.value.message


def test_load_bad_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))


def test_env_var_honoured_by_load_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "env.toml"
    f.write_text('device_id = "from-env"\ngroups = ["g1"]\n')
    monkeypatch.setenv(config.ENV_CONFIG, str(f))
    cfg = load(None)
    assert cfg.device_id == "from-env"
    assert cfg.groups == ["g1"]
    assert cfg.source == str(f)


def test_explicit_path_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text('device_id = "from-env"\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('device_id = "explicit"\n')
    monkeypatch.setenv(config.ENV_CONFIG, str(env_file))
    assert load(str(explicit)).device_id == "explicit"


def test_set_dotted_sets_and_validates() -> None:
    cfg = from_dict({"device_id": "d1"})
    set_dotted(cfg, "telemetry.window_s", 10)
    assert cfg.telemetry.window_s == 10.0
    set_dotted(cfg, "groups", ["a", "b"])
    assert cfg.groups == ["a", "b"]
    set_dotted(cfg, "backends.prefer", ["onnxruntime:CPUExecutionProvider"])
    assert cfg.backends.prefer == ["onnxruntime:CPUExecutionProvider"]


@pytest.mark.parametrize(("key", "value", "named"), [
    ("telemetry.nope", 1, "telemetry.nope"),
    ("nope", 1, "nope"),
    ("a.b.c", 1, "a.b.c"),
    ("storage.keep_versions", "2", "storage.keep_versions"),
    ("storage.keep_versions", 0, "storage.keep_versions"),
    ("backends.prefer", ["no-colon"], "backends.prefer"),
])
def test_set_dotted_errors_name_the_key(key: str, value: Any, named: str) -> None:
    cfg = from_dict({"device_id": "d1"})
    with pytest.raises(ConfigError) as ei:
        set_dotted(cfg, key, value)
    assert named in ei.value.message
