"""Hardware profiles: loading TOML profile files and matching them against `HardwareFacts`.

A profile file (``<dir>/<name>.toml``) describes one hardware class::

    name = "coral-edgetpu"          # [a-z0-9_-]; the key for overrides and forcing
    description = "..."
    priority = 100                  # int; accelerators > boards > generic
    notes = "..."                   # optional free text

    [match]                         # at least one of any_of / all_of
    any_of = [ { usb_id = ["1a6e:089a", "18d1:9302"] }, { device_node = "/dev/apex_*" } ]
    all_of = [ { arch = "aarch64" } ]

    [[backends]]                    # ranked, best first
    runtime = "tflite"              # onnxruntime | openvino | tflite
    target = "edgetpu"              # provider / device / delegate
    precisions = ["int8"]           # preferred first
    why = "..."                     # required: why this rank
    requires = ["coral_edgetpu"]    # optional: accelerators that must be present and ready
    runtime_version_min = "2020.4"  # optional, inclusive
    runtime_version_below = "2023.0"  # optional, exclusive
    precision_requires = { fp16 = "fp16" }  # optional: precision -> cpu_isa tag it needs

Rule semantics: a condition table holds when every key in it holds (AND); a list value holds when any
listed value holds.  ``any_of`` holds when at least one condition holds, ``all_of`` when all do; when both
are given both must hold.  Predicates: arch, board (regex on facts.board), compatible (regex on any
device-tree compatible string), board_family, usb_id / pci_id ("vvvv:pppp", fnmatch wildcards allowed),
device_node (fnmatch on detected /dev nodes), accelerator (present in facts.accelerators), cpu_feature.

Invariants:

* `load_profiles` never raises for bad content: a file that cannot be read, parsed or validated is
  skipped and reported in ``problems`` as (path, reason).  Unknown keys are errors (a typo'd predicate
  would otherwise silently never match).
* Directories are given in precedence order: a profile name found in an earlier directory hides the
  same name in later ones (so /etc/edge-agent/hw-profiles overrides the shipped files).  A file that
  fails to load does not hide anything.
* `match_profile` is deterministic: highest priority first, ties broken by name.  The primary profile's
  backends come first, then the backends of every other matching profile in that order, de-duplicated
  by "runtime:target" (first occurrence wins).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.hardware.probe import ACCELERATOR_NAMES, HardwareFacts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 uses the tomli backport (see pyproject.toml)
    import tomli as tomllib

log = logging.getLogger(__name__)

MAX_PROFILE_BYTES = 256 * 1024  # a profile file larger than this is rejected
MAX_PROFILE_FILES = 256  # files considered at most per directory
RUNTIMES = ("onnxruntime", "openvino", "tflite")
PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
PROFILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ID_PATTERN_RE = re.compile(r"^[0-9a-f*?]{4}:[0-9a-f*?]{4}$")
AUTO = "auto"

SYSTEM_PROFILES_DIR = Path("/usr/share/edge-agent/hw-profiles")
ETC_PROFILES_DIR = Path("/etc/edge-agent/hw-profiles")
REPO_PROFILES_DIR = Path(__file__).resolve().parents[2] / "hw-profiles"
# A wheel install puts the shipped profiles under the environment's prefix (pyproject data-files).
PREFIX_PROFILES_DIR = Path(sys.prefix) / "share" / "edge-agent" / "hw-profiles"

TOP_LEVEL_KEYS = {"name", "description", "priority", "notes", "match", "backends"}
BACKEND_KEYS = {"runtime", "target", "precisions", "why", "requires", "runtime_version_min",
                "runtime_version_below", "precision_requires"}
STR_OR_LIST_PREDICATES = {"arch", "board_family", "usb_id", "pci_id", "device_node", "accelerator", "cpu_feature"}
REGEX_PREDICATES = {"board", "compatible"}


class ProfileError(ValueError):
    """A profile file is invalid; the message says why."""


@dataclass(frozen=True)
class BackendSpec:
    runtime: str
    target: str
    precisions: tuple[str, ...]
    why: str
    requires: tuple[str, ...] = ()
    runtime_version_min: str | None = None
    runtime_version_below: str | None = None
    precision_requires: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.target}"


@dataclass(frozen=True)
class Condition:
    """All predicates must hold.  Values are tuples of alternatives (any may hold)."""

    predicates: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    priority: int
    any_of: tuple[Condition, ...]
    all_of: tuple[Condition, ...]
    backends: tuple[BackendSpec, ...]
    path: str
    notes: str | None = None


@dataclass(frozen=True)
class ProfileProblem:
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class RankedBackend:
    spec: BackendSpec
    profile: str


@dataclass
class Match:
    profile: Profile | None
    reason: str
    matched: list[tuple[str, str]] = field(default_factory=list)  # (profile name, why it matched)
    backends: list[RankedBackend] = field(default_factory=list)
    forced: bool = False

    @property
    def name(self) -> str | None:
        return self.profile.name if self.profile else None


# --------------------------------------------------------------------------------------------
# loading


def shipped_profiles_dir() -> Path:
    """The profiles shipped with the agent: the repo's hw-profiles/ when running from a checkout,
    else <venv>/share/edge-agent/hw-profiles (a wheel install), else /usr/share/edge-agent/hw-profiles."""
    for d in (REPO_PROFILES_DIR, PREFIX_PROFILES_DIR):
        if d.is_dir():
            return d
    return SYSTEM_PROFILES_DIR


def default_profile_dirs() -> list[Path]:
    """Directories in precedence order: local overrides in /etc, then the repo's hw-profiles/ (when running
    from a checkout), then /usr/share/edge-agent/hw-profiles.  Missing directories are skipped by
    `load_profiles`."""
    dirs = [ETC_PROFILES_DIR, REPO_PROFILES_DIR, PREFIX_PROFILES_DIR, SYSTEM_PROFILES_DIR]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def _as_str_tuple(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ProfileError(f"{key}: expected a string or a list of strings, got {type(value).__name__}")
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ProfileError(f"{key}: expected non-empty strings")
    return tuple(items)


def _parse_condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, dict) or not raw:
        raise ProfileError(f"{where}: each condition must be a non-empty table")
    preds: list[tuple[str, tuple[str, ...]]] = []
    for key, value in raw.items():
        if key in REGEX_PREDICATES:
            values = _as_str_tuple(value, f"{where}.{key}")
            for v in values:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise ProfileError(f"{where}.{key}: bad regular expression {v!r}: {exc}") from exc
        elif key in STR_OR_LIST_PREDICATES:
            values = _as_str_tuple(value, f"{where}.{key}")
            if key in ("usb_id", "pci_id"):
                values = tuple(v.lower() for v in values)
                bad = [v for v in values if not ID_PATTERN_RE.match(v)]
                if bad:
                    raise ProfileError(f"{where}.{key}: ids must look like 'vvvv:pppp' (hex, wildcards ok): {bad}")
            if key == "accelerator":
                bad = [v for v in values if v not in ACCELERATOR_NAMES]
                if bad:
                    raise ProfileError(f"{where}.accelerator: unknown {bad}; known: {list(ACCELERATOR_NAMES)}")
        else:
            raise ProfileError(f"{where}: unknown predicate {key!r}; known: "
                               f"{sorted(STR_OR_LIST_PREDICATES | REGEX_PREDICATES)}")
        preds.append((key, values))
    return Condition(tuple(preds))


def _parse_backend(raw: Any, where: str) -> BackendSpec:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: must be a table")
    unknown = set(raw) - BACKEND_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)}")
    runtime = raw.get("runtime")
    if runtime not in RUNTIMES:
        raise ProfileError(f"{where}.runtime: must be one of {list(RUNTIMES)}, got {runtime!r}")
    target = raw.get("target")
    if not isinstance(target, str) or not target:
        raise ProfileError(f"{where}.target: required non-empty string")
    why = raw.get("why")
    if not isinstance(why, str) or not why.strip():
        raise ProfileError(f"{where}.why: required non-empty string explaining the rank")
    if "precisions" not in raw:
        raise ProfileError(f"{where}.precisions: required list such as ['fp16', 'fp32']")
    precisions = _as_str_tuple(raw["precisions"], f"{where}.precisions")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ProfileError(f"{where}.precisions: unknown {bad}; known: {list(PRECISIONS)}")
    requires = _as_str_tuple(raw["requires"], f"{where}.requires") if "requires" in raw else ()
    bad = [r for r in requires if r not in ACCELERATOR_NAMES]
    if bad:
        raise ProfileError(f"{where}.requires: unknown accelerators {bad}; known: {list(ACCELERATOR_NAMES)}")
    versions: dict[str, str | None] = {}
    for key in ("runtime_version_min", "runtime_version_below"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or parse_version(value) is None):
            raise ProfileError(f"{where}.{key}: expected a version string such as '2023.0'")
        versions[key] = value
    prec_req_raw = raw.get("precision_requires", {})
    if not isinstance(prec_req_raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prec_req_raw.items()):
        raise ProfileError(f"{where}.precision_requires: expected a table of precision = \"cpu_isa tag\"")
    bad = [k for k in prec_req_raw if k not in precisions]
    if bad:
        raise ProfileError(f"{where}.precision_requires: {bad} not among this backend's precisions")
    return BackendSpec(runtime=runtime, target=target, precisions=precisions, why=why.strip(),
                       requires=requires, runtime_version_min=versions["runtime_version_min"],
                       runtime_version_below=versions["runtime_version_below"],
                       precision_requires=tuple(sorted(prec_req_raw.items())))


def parse_profile(data: dict[str, Any], path: str) -> Profile:
    """Validate a parsed TOML document.  Raises ProfileError with a reason."""
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise ProfileError(f"unknown top-level keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not PROFILE_NAME_RE.match(name):
        raise ProfileError(f"name: required, lower-case letters, digits, '-' or '_', got {name!r}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ProfileError("description: required non-empty string")
    priority = data.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ProfileError(f"priority: required integer, got {priority!r}")
    notes = data.get("notes")
    if notes is not None and not isinstance(notes, str):
        raise ProfileError("notes: must be a string")
    match = data.get("match")
    if not isinstance(match, dict):
        raise ProfileError("[match]: required table with any_of and/or all_of")
    unknown = set(match) - {"any_of", "all_of"}
    if unknown:
        raise ProfileError(f"[match]: unknown keys {sorted(unknown)}; use any_of / all_of")
    groups: dict[str, tuple[Condition, ...]] = {}
    for key in ("any_of", "all_of"):
        raw = match.get(key, [])
        if not isinstance(raw, list):
            raise ProfileError(f"match.{key}: must be an array of tables")
        groups[key] = tuple(_parse_condition(c, f"match.{key}[{i}]") for i, c in enumerate(raw))
    if not groups["any_of"] and not groups["all_of"]:
        raise ProfileError("[match]: has no rules (any_of / all_of are empty), the profile could never match")
    raw_backends = data.get("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise ProfileError("[[backends]]: required, at least one")
    backends = tuple(_parse_backend(b, f"backends[{i}]") for i, b in enumerate(raw_backends))
    names = [b.name for b in backends]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProfileError(f"[[backends]]: duplicate runtime:target {dupes}")
    return Profile(name=name, description=description.strip(), priority=priority, any_of=groups["any_of"],
                   all_of=groups["all_of"], backends=backends, path=path, notes=notes)


def load_profile_file(path: Path) -> Profile:
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise ProfileError(f"file is {size} bytes, over the {MAX_PROFILE_BYTES}-byte limit")
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except ProfileError:
        raise
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"invalid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read: {exc}") from exc
    return parse_profile(data, str(path))


def load_profiles(dirs: Sequence[Path | str]) -> tuple[list[Profile], list[ProfileProblem]]:
    """Load *.toml profiles from dirs (earlier dirs override later ones by name).

    Returns (profiles sorted by priority desc then name, problems).  Never raises for bad files;
    missing directories are skipped silently.
    """
    chosen: dict[str, Profile] = {}
    problems: list[ProfileProblem] = []
    for d in dirs:
        directory = Path(d)
        try:
            if not directory.is_dir():
                log.debug("profile directory %s does not exist; skipped", directory)
                continue
            files = sorted(directory.glob("*.toml"))
        except OSError as exc:
            problems.append(ProfileProblem(str(directory), f"cannot list directory: {exc}"))
            continue
        if len(files) > MAX_PROFILE_FILES:
            problems.append(ProfileProblem(str(directory), f"{len(files)} files; only the first "
                                           f"{MAX_PROFILE_FILES} were read"))
            files = files[:MAX_PROFILE_FILES]
        in_this_dir: dict[str, str] = {}
        for path in files:
            try:
                profile = load_profile_file(path)
            except ProfileError as exc:
                log.warning("hardware profile %s rejected: %s", path, exc)
                problems.append(ProfileProblem(str(path), str(exc)))
                continue
            if profile.name in in_this_dir:
                problems.append(ProfileProblem(str(path), f"duplicate profile name {profile.name!r} (also in "
                                               f"{in_this_dir[profile.name]}); ignored"))
                continue
            in_this_dir[profile.name] = str(path)
            if profile.name in chosen:
                log.info("hardware profile %s from %s is overridden by %s", profile.name, path,
                         chosen[profile.name].path)
                continue
            if path.stem != profile.name:
                log.warning("hardware profile %s is named %r; the name, not the file name, is used", path,
                            profile.name)
            chosen[profile.name] = profile
    return sorted(chosen.values(), key=lambda p: (-p.priority, p.name)), problems


# --------------------------------------------------------------------------------------------
# matching


def _any_regex(patterns: tuple[str, ...], values: list[str]) -> str | None:
    for pattern in patterns:
        for value in values:
            if re.search(pattern, value, re.IGNORECASE):
                return f"{value!r} ~ /{pattern}/"
    return None


def _any_fnmatch(patterns: tuple[str, ...], values: list[str]) -> str | None:
    for pattern in patterns:
        for value in values:
            if fnmatch.fnmatchcase(value, pattern):
                return value
    return None


def _eval_predicate(key: str, values: tuple[str, ...], facts: HardwareFacts) -> str | None:
    """Why the predicate holds, or None."""
    hit: str | None = None
    if key == "arch":
        hit = facts.architecture if facts.architecture in values else None
    elif key == "board":
        hit = _any_regex(values, [facts.board] if facts.board else [])
    elif key == "compatible":
        hit = _any_regex(values, facts.dt_compatible)
    elif key == "board_family":
        hit = facts.board_family if facts.board_family in values else None
    elif key == "usb_id":
        hit = _any_fnmatch(values, facts.usb_ids())
    elif key == "pci_id":
        hit = _any_fnmatch(values, facts.pci_ids())
    elif key == "device_node":
        hit = _any_fnmatch(values, facts.device_nodes)
    elif key == "accelerator":
        hit = next((v for v in values if facts.accelerator_present(v)), None)
    elif key == "cpu_feature":
        hit = next((v for v in values if v in facts.cpu_features or v in facts.cpu_isa), None)
    return f"{key} {hit}" if hit else None


def _eval_condition(cond: Condition, facts: HardwareFacts) -> str | None:
    reasons = []
    for key, values in cond.predicates:
        why = _eval_predicate(key, values, facts)
        if why is None:
            return None
        reasons.append(why)
    return " and ".join(reasons)


def profile_matches(profile: Profile, facts: HardwareFacts) -> str | None:
    """Why the profile matches the facts, or None."""
    reasons: list[str] = []
    if profile.any_of:
        hit = next((r for r in (_eval_condition(c, facts) for c in profile.any_of) if r), None)
        if hit is None:
            return None
        reasons.append(hit)
    for cond in profile.all_of:
        why = _eval_condition(cond, facts)
        if why is None:
            return None
        reasons.append(why)
    return "; ".join(reasons)


def _merge_backends(profiles: list[Profile]) -> list[RankedBackend]:
    out: list[RankedBackend] = []
    seen: set[str] = set()
    for profile in profiles:
        for spec in profile.backends:
            if spec.name not in seen:
                seen.add(spec.name)
                out.append(RankedBackend(spec, profile.name))
    return out


def match_profile(facts: HardwareFacts, profiles: Sequence[Profile], forced: str = AUTO) -> Match:
    """Choose the profile for facts.

    forced="auto" picks the highest-priority matching profile and appends the backends of the other
    matching profiles (e.g. a Raspberry Pi with a Coral: coral-edgetpu's backends, then raspberry-pi's).
    Any other value selects that profile by name regardless of the rules, with only its own backends;
    an unknown forced name falls back to automatic matching and says so in the reason.
    """
    ordered = sorted(profiles, key=lambda p: (-p.priority, p.name))
    prefix = ""
    if forced and forced != AUTO:
        chosen = next((p for p in ordered if p.name == forced), None)
        if chosen is not None:
            why = profile_matches(chosen, facts)
            reason = (f"forced by configuration (hw_profile = {forced!r}); its rules "
                      + (f"also match: {why}" if why else "do not match this hardware"))
            return Match(profile=chosen, reason=reason, matched=[(chosen.name, "forced")],
                         backends=_merge_backends([chosen]), forced=True)
        prefix = (f"forced profile {forced!r} is not among the loaded profiles "
                  f"({', '.join(p.name for p in ordered) or 'none'}); fell back to automatic matching: ")
        log.warning("forced hardware profile %r not found; falling back to automatic matching", forced)
    hits: list[tuple[Profile, str]] = []
    for profile in ordered:
        why = profile_matches(profile, facts)
        if why:
            hits.append((profile, why))
    if not hits:
        return Match(profile=None, reason=prefix + "no profile matched (architecture "
                     f"{facts.architecture or 'unknown'}, board {facts.board or 'unknown'})")
    primary, why = hits[0]
    reason = f"{primary.name} (priority {primary.priority}) matched: {why}"
    if len(hits) > 1:
        reason += "; also matched, backends appended: " + "; ".join(
            f"{p.name} (priority {p.priority}): {w}" for p, w in hits[1:])
    return Match(profile=primary, reason=prefix + reason, matched=[(p.name, w) for p, w in hits],
                 backends=_merge_backends([p for p, _ in hits]))


# --------------------------------------------------------------------------------------------
# versions


def parse_version(text: str) -> tuple[int, ...] | None:
    """Leading dotted integers of a version string: '2024.4.0-16579-...' -> (2024, 4, 0)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)*)", text or "")
    if not m:
        return None
    return tuple(int(x) for x in m.group(1).split("."))


def version_in_range(version: str | None, minimum: str | None, below: str | None) -> tuple[bool, str]:
    if minimum is None and below is None:
        return True, ""
    parsed = parse_version(version or "")
    if parsed is None:
        return False, f"version {version!r} cannot be compared"
    if minimum is not None and parsed < (parse_version(minimum) or ()):
        return False, f"version {version} is older than {minimum}"
    if below is not None and parsed >= (parse_version(below) or ()):
        return False, f"version {version} is not below {below}"
    return True, ""
