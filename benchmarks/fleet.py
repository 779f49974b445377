"""6. Fleet scale: simulated agents (``fleetctl sim``: real MQTT 5 clients that verify every signed
command with the agent's own verifier and answer job updates like the agent) on one local
Mosquitto. For 100, 500 and 1000 devices: connect time, the time from one signed group deploy's
publish until every device reported SUCCEEDED, the broker's message rate during that wave, and
CPU per simulated device idle and during the wave (simulator processes; the broker separately).

Simulated devices publish heartbeats and telemetry at the agent's default 60 s periods.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

from benchmarks import harness as h
from benchmarks.context import Context

GROUP = "fleet"
WAVE_TIMEOUT_S = 120.0
SYS_INTERVAL_S = 1  # mosquitto sys_interval here
READY_TIMEOUT_S = 120.0


def _sim(ctx: Context, broker: h.Broker, n: int) -> subprocess.Popen[str]:
    procs = max(1, min(ctx.scale.fleet_processes, n))
    return subprocess.Popen(
        [h.PYTHON, "-m", "fleetctl.main", "sim", "--broker", broker.url, "--devices", str(n),
         "--processes", str(procs), "--trust", str(ctx.fleet.trust_dir), "--group", GROUP,
         "--heartbeat", "60", "--window", "60", "--model", "fleetmodel:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=h.env(), cwd=h.REPO,
        start_new_session=True)  # its own process group: stopped with its shard processes


def one(ctx: Context, n: int, manifest_url: str) -> dict[str, Any]:
    from fleetctl.commands import deploy_params

    broker = h.Broker(ctx.work / f"broker-fleet-{n}", sys_interval_s=SYS_INTERVAL_S).start()
    done: dict[str, float] = {}
    counts = {"all": 0}
    lock = threading.Lock()
    cid_box = [""]

    def hook(m: h.Message) -> None:
        with lock:
            counts["all"] += 1
            if cid_box[0] and m.topic.endswith(f"/jobs/{cid_box[0]}") and m.doc.get("state") == "SUCCEEDED":
                done.setdefault(m.topic.split("/")[1], m.t)

    obs = h.Observer(broker, topics=(f"{h.PREFIX}/#",), keep=False, on_message=hook)
    sysobs = _SysCounter(broker)
    sim = _sim(ctx, broker, n)
    try:
        t0 = time.monotonic()
        assert sim.stdout is not None
        line = ""
        while time.monotonic() - t0 < READY_TIMEOUT_S:
            line = sim.stdout.readline()
            if not line or line.startswith("ready"):
                break
        if not line.startswith("ready"):
            raise RuntimeError(f"simulator did not become ready (exit {sim.poll()})")
        connect_s = time.monotonic() - t0
        time.sleep(1.0)
        pids = [sim.pid]
        c0, b0, t_idle = h.tree_cpu_s(pids), h.tree_cpu_s([broker.proc.pid]), time.monotonic()  # type: ignore[union-attr]
        time.sleep(ctx.scale.fleet_idle_s)
        idle_dt = time.monotonic() - t_idle
        sim_idle = (h.tree_cpu_s(pids) - c0) / idle_dt
        broker_idle = (h.tree_cpu_s([broker.proc.pid]) - b0) / idle_dt  # type: ignore[union-attr]

        cid, env_bytes = ctx.fleet.command("deploy", deploy_params("fleetmodel", manifest_url), {"group": GROUP})
        cid_box[0] = cid
        with lock:
            m0 = counts["all"]
        s0 = sysobs.snapshot()
        c1, b1 = h.tree_cpu_s(pids), h.tree_cpu_s([broker.proc.pid])  # type: ignore[union-attr]
        t_pub = time.monotonic()
        obs.publish(f"{h.PREFIX}/groups/{GROUP}/cmd", env_bytes)
        deadline = t_pub + WAVE_TIMEOUT_S
        while time.monotonic() < deadline:
            with lock:
                if len(done) >= n:
                    break
            time.sleep(0.02)
        t_end = time.monotonic()
        wave = t_end - t_pub
        time.sleep(SYS_INTERVAL_S * 2.2)  # $SYS counters lag by up to one interval
        s1 = sysobs.snapshot()
        sim_wave = (h.tree_cpu_s(pids) - c1) / wave
        broker_wave = (h.tree_cpu_s([broker.proc.pid]) - b1) / wave  # type: ignore[union-attr]
        with lock:
            msgs = counts["all"] - m0
            times = sorted(t - t_pub for t in done.values())
        return {
            "devices": n, "reached": len(times), "connect_s": connect_s,
            "all_succeeded_s": times[-1] if len(times) >= n else None,
            "per_device_s": h.stats(times).to_dict(), "wave_s": wave,
            "messages": msgs, "messages_per_s": msgs / wave if wave > 0 else None,
            "broker_sys": {k: s1.get(k, 0) - s0.get(k, 0) for k in s1},
            "cpu_pct_per_device_idle": 100 * sim_idle / n, "cpu_pct_per_device_wave": 100 * sim_wave / n,
            "broker_cpu_pct_idle": 100 * broker_idle, "broker_cpu_pct_wave": 100 * broker_wave,
            "cdf": {"t_s": [round(t, 4) for t in times[:: max(1, len(times) // 500)]]},
        }
    finally:
        h.stop_process(sim, 20, group=True)
        obs.close()
        sysobs.close()
        broker.stop()


class _SysCounter:
    """Mosquitto's $SYS message counters (published every sys_interval)."""

    TOPICS = ("$SYS/broker/messages/received", "$SYS/broker/messages/sent",
              "$SYS/broker/publish/messages/received", "$SYS/broker/publish/messages/sent")

    def __init__(self, broker: h.Broker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.values: dict[str, float] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sys-{id(self)}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(t, 0) for t in self.TOPICS])

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        try:
            v = float(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.values[msg.topic.replace("$SYS/broker/", "")] = v

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(ctx: Context) -> dict[str, Any]:
    from fleetctl.bundle import build_bundle

    model = h.make_mlp(ctx.work / "src" / "fleetmodel.onnx", seed=300)
    manifest = build_bundle(model, ctx.bundles / "fleetmodel" / "1", "fleetmodel", 1, ctx.fleet.keys, samples=1,
                            overwrite=True)
    out: dict[str, Any] = {"sizes": []}
    for n in ctx.scale.fleet_sizes:
        ctx.log(f"fleet: {n} simulated devices")
        out["sizes"].append(one(ctx, n, ctx.url(manifest)))
    return out
