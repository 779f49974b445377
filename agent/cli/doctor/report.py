"""What a doctor check reports: ``Check`` (PASS, WARN or FAIL, a detail line and, unless it
passed, a hint saying how to fix it) and the ``Report`` of all of them, as text or JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["data"]:
            d.pop("data")
        return d


@dataclass
class Report:
    checks: list[Check]
    config: dict[str, Any] | None
    config_source: str

    @property
    def summary(self) -> dict[str, int]:
        return {s.lower(): sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary, "checks": [c.to_dict() for c in self.checks],
                "config_source": self.config_source, "config": self.config}

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=4)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
            if c.hint and c.status != PASS:
                lines.append(f"{'':4}  {'':<{width}}  → {c.hint}")
        s = self.summary
        lines.append(f"\n{s['pass']} passed, {s['warn']} warning{'' if s['warn'] == 1 else 's'}, {s['fail']} failed"
                     f" (config: {self.config_source})")
        return "\n".join(lines)


def guard(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    try:
        return fn()
    except Exception as e:  # a check that breaks is that check's failure, never the doctor's
        return [Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}",
                      "report this with `agentctl doctor --json` output")]
