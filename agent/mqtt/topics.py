"""Topic names of PROTOCOL.md."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str

    @property
    def cmd(self) -> str:
        return f"{self.prefix}/{self.device}/cmd"

    def group_cmd(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/cmd"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}/{self.device}/jobs/{job_id}"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device}/status"

    @property
    def heartbeat(self) -> str:
        return f"{self.prefix}/{self.device}/heartbeat"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}/{self.device}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.prefix}/{self.device}/events"
