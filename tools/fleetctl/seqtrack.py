"""Lost and duplicated messages per (device, stream), from the devices' sequence numbers.

Each device numbers every stream (``heartbeat``, ``telemetry``, ``events``, ``jobs``, ``status``)
by one per message (docs/protocol.md); delivery is at least once, so a collector sees duplicates
(a re-send whose PUBACK was lost) and, when something drops messages, gaps.

Invariants:
- Memory per (device, stream) is bounded: the highest ``seq`` seen, a bit mask of the
  ``WINDOW`` numbers below it, and at most ``MAX_OPEN_GAPS`` open gaps (older gaps beyond that
  count as lost at once).
- A gap is only declared lost after ``grace_s`` without the missing number arriving, so a
  message delivered late (a re-send after a reconnect) is not counted lost.
- A number far below the mask (more than ``WINDOW`` under the highest) means the device started
  its numbering again (a recreated outbox, a restarted simulator): the stream starts afresh.
- With ``count_gaps=False`` (a collector that sees only part of each stream, see
  docs/fleet-observability.md) gaps are never recorded; duplicates still are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 256  # numbers below the highest remembered for duplicate detection (≥ the agent's 32 in flight)
MAX_OPEN_GAPS = 256  # missing numbers awaited per (device, stream); beyond that, counted lost at once
DEFAULT_GRACE_S = 120.0  # a missing number not arrived within this long is lost
_MASK = (1 << WINDOW) - 1


@dataclass(slots=True)
class _Stream:
    high: int
    seen: int = 1  # bit k: number ``high - k`` arrived
    gaps: dict[int, float] = field(default_factory=dict)  # missing number → when noticed


@dataclass
class SeqTracker:
    """Counts ``lost`` and ``duplicates`` over every (device, stream) it is shown."""

    grace_s: float = DEFAULT_GRACE_S
    count_gaps: bool = True
    lost: dict[str, int] = field(default_factory=dict)  # per stream
    duplicates: dict[str, int] = field(default_factory=dict)  # per stream
    resets: int = 0
    _streams: dict[tuple[str, str], _Stream] = field(default_factory=dict)
    _gappy: set[tuple[str, str]] = field(default_factory=set)  # keys with open gaps

    def see(self, device: str, stream: str, seq: int, now: float) -> bool:
        """Record one message; False when it is a duplicate (already seen: skip it)."""
        key = (device, stream)
        s = self._streams.get(key)
        if s is None:
            self._streams[key] = _Stream(seq)
            return True
        if seq > s.high:
            shift = seq - s.high
            if self.count_gaps and shift > 1:
                self._open_gaps(key, s, s.high + 1, seq, now)
            s.seen = ((s.seen << shift) | 1) & _MASK if shift < WINDOW else 1
            s.high = seq
            return True
        back = s.high - seq
        if back >= WINDOW:
            self.resets += 1
            self._streams[key] = _Stream(seq)
            self._gappy.discard(key)
            return True
        bit = 1 << back
        if s.seen & bit:
            self.duplicates[stream] = self.duplicates.get(stream, 0) + 1
            return False
        s.seen |= bit
        s.gaps.pop(seq, None)  # arrived late: not lost
        return True

    def _open_gaps(self, key: tuple[str, str], s: _Stream, first: int, end: int, now: float) -> None:
        missing = end - first
        room = max(0, MAX_OPEN_GAPS - len(s.gaps))
        if missing > room:
            self._lose(key[1], missing - room)
            first = end - room
        for n in range(first, end):
            s.gaps[n] = now
        if s.gaps:
            self._gappy.add(key)

    def _lose(self, stream: str, n: int) -> None:
        if n:
            self.lost[stream] = self.lost.get(stream, 0) + n

    def settle(self, now: float) -> None:
        """Count as lost every gap older than ``grace_s`` (call before reading ``lost``)."""
        cutoff = now - self.grace_s
        for key in list(self._gappy):
            s = self._streams.get(key)
            if s is None:
                self._gappy.discard(key)
                continue
            old = [n for n, t in s.gaps.items() if t <= cutoff or s.high - n >= WINDOW]
            for n in old:
                del s.gaps[n]
            self._lose(key[1], len(old))
            if not s.gaps:
                self._gappy.discard(key)

    def forget(self, device: str) -> None:
        """Drop a device's streams (it left the table); open gaps are not counted."""
        for key in [k for k in self._streams if k[0] == device]:
            del self._streams[key]
            self._gappy.discard(key)

    @property
    def open_gaps(self) -> int:
        return sum(len(self._streams[k].gaps) for k in self._gappy if k in self._streams)
