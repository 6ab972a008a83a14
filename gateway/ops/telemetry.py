"""Health telemetry: host probes, the Prometheus rendering of ``status``, the textfile.

The agent's ``status`` dict (``Agent.status``) is the one source: it is published
retained on ``P/S/status`` (contract §4), answered on the control socket, and rendered
here, unchanged in meaning, as Prometheus text exposition format (version 0.0.4) for
sites that scrape.  Nothing here talks to the broker or the hardware.

Host probes
-----------
Cheap enough for every report (a few syscalls and small reads, no subprocess):

* free and total bytes of the filesystem holding the state database (``os.statvfs``):
  a full SD card is the usual way a gateway stops keeping its outbox;
* CPU temperature, the hottest of ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees
  Celsius) that can be read; ``None`` where there is none (containers, most x86 VMs);
* the 1-minute load average and this process's resident memory (``/proc/self/statm``),
  ``None`` where the platform has no such thing.

A probe that fails gives ``None``, never an exception: a report must go out even when
the disk it describes is what is broken.

Metrics
-------
Every name starts with ``stora_gateway_``.  Gauges are values that go up and down
(queue depth, dead letters now held, temperature); counters are totals since the agent
started (``_total``), which Prometheus turns into rates and which reset on restart.
A value that is unknown (no temperature, nothing delivered yet) is left out rather
than written as 0 or NaN, so an alert on it never fires on an absence.  Controller
names are label values, escaped (``\\``, ``"``, newline) as the format requires; error
texts are not exported (unbounded label values), they stay in the JSON status.

Times
-----
``status`` leaves this process (MQTT, the control socket, files), so every instant in it
is RFC 3339 UTC and every other number a count, a size or a duration named ``*_s``:
:func:`broker_status` and :func:`schedule_status` turn the link's and the scheduler's
monotonic stamps into wall times by their age.  The verdict (gateway/ops/health.py) is
exported as the state set ``stora_gateway_verdict{verdict=…}``.

Textfile
--------
:func:`write_textfile` writes a temporary file in the target's directory (named so the
collector's ``*.prom`` glob never matches it), fsyncs it, renames it over the target
and fsyncs the directory: a scrape sees the old file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.ops.health import VERDICTS
from gateway.outbox.policy import NEWEST_DEAD_KEY, refusal_text
from sitelink.payloads import rfc3339

if TYPE_CHECKING:
    from gateway.store import Store

__all__ = [
    "METRIC_PREFIX",
    "THERMAL_ROOT",
    "Metric",
    "broker_status",
    "cpu_temperature",
    "disk_usage",
    "host_status",
    "last_delivered_at",
    "load_1m",
    "metrics_from_status",
    "newest_dead_letter",
    "render_prometheus",
    "resident_memory",
    "schedule_status",
    "wall_time",
    "write_textfile",
]

LOGGER = logging.getLogger(__name__)

METRIC_PREFIX: Final = "stora_gateway_"
#: Where Linux lists its thermal zones.
THERMAL_ROOT: Final = Path("/sys/class/thermal")
#: Readings outside this range (°C) are a driver's placeholder, not a temperature
#: (some zones report -273.15 or 0 when the sensor is absent).
_PLAUSIBLE_C: Final = (-40.0, 150.0)
_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# --------------------------------------------------------------------------- host probes


def disk_usage(path: Path) -> dict[str, int] | None:
    """Free (to this unprivileged process) and total bytes of the filesystem at ``path``.

    ``path`` may not exist yet (a fresh install): its nearest existing parent is used.
    """
    probe = Path(path)
    while not os.path.exists(probe) and probe != probe.parent:  # False on EACCES too
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return {"free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}


def cpu_temperature(root: Path = THERMAL_ROOT) -> float | None:
    """The hottest readable thermal zone under ``root``, in °C (0.1 °C), or ``None``.

    The hottest, not the first: on a Pi there is one zone (``cpu-thermal``), on other
    boards the first zone may be the battery or the PMIC while the SoC throttles.
    """
    readings = []
    try:
        zones = sorted(root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for zone in zones:
        try:
            millidegrees = int(zone.read_text(encoding="ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # a zone whose sensor is off answers EINVAL/ENODATA; skip it
        celsius = millidegrees / 1000
        if _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
            readings.append(celsius)
    return round(max(readings), 1) if readings else None


def load_1m() -> float | None:
    """The 1-minute load average, or ``None`` where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def resident_memory(statm: Path = Path("/proc/self/statm")) -> int | None:
    """This process's resident set size in bytes (Linux), or ``None``."""
    try:
        pages = int(statm.read_text(encoding="ascii").split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def host_status(storage_path: Path, *, thermal_root: Path = THERMAL_ROOT) -> dict[str, Any]:
    """The ``host`` part of ``status``: disk of ``storage_path``, CPU temperature, load, RSS.

    Values that cannot be read are ``None``.
    """
    disk = disk_usage(Path(storage_path).parent)
    return {
        "disk_path": str(Path(storage_path).parent),
        "disk_free_bytes": disk["free_bytes"] if disk else None,
        "disk_total_bytes": disk["total_bytes"] if disk else None,
        "cpu_temp_c": cpu_temperature(thermal_root),
        "load_1m": load_1m(),
        "rss_bytes": resident_memory(),
    }


# --------------------------------------------------------------------------- times

#: ``MqttLink.stats()`` keys that are instants on the link's monotonic clock: shown as
#: RFC 3339 wall times, since a monotonic number means nothing outside the process.
_LINK_INSTANTS: Final = ("last_connect_at", "last_disconnect_at")


def wall_time(monotonic: float | None, *, mono_now: float, wall_now: float) -> str | None:
    """A monotonic instant as RFC 3339 UTC, by its age: ``wall_now - (mono_now - t)``."""
    if monotonic is None:
        return None
    return rfc3339(wall_now - max(0.0, mono_now - monotonic))


def broker_status(stats: Mapping[str, Any], *, mono_now: float,
                  wall_now: float) -> dict[str, Any]:
    """The ``broker`` part of ``status`` from ``MqttLink.stats()``: instants as RFC 3339,
    ``reconnect_delays`` named for their unit (``reconnect_delays_s``).

    ``mono_now`` must be read from the link's clock: ``time.monotonic``, its default,
    which the agent keeps.
    """
    out = dict(stats)
    for key in _LINK_INSTANTS:
        if key in out:
            value = out[key]
            out[key] = wall_time(value, mono_now=mono_now, wall_now=wall_now) \
                if isinstance(value, int | float) else value
    if "reconnect_delays" in out:
        out["reconnect_delays_s"] = [round(d, 2) for d in out.pop("reconnect_delays")]
    return out


def schedule_status(stats: Mapping[str, Any] | None, *, wall_now: float) -> Any:
    """The ``schedule`` part of ``status`` from ``Scheduler.stats()``: each job's
    ``last_run_s_ago`` becomes ``last_run_at`` (RFC 3339), when it last finished."""
    if not isinstance(stats, Mapping):
        return stats
    jobs = stats.get("jobs")
    if not isinstance(jobs, Mapping):
        return dict(stats)
    shown = {}
    for name, job in jobs.items():
        shown[name] = {k: v for k, v in job.items() if k != "last_run_s_ago"}
        ago = job.get("last_run_s_ago")
        shown[name]["last_run_at"] = None if ago is None else rfc3339(wall_now - ago)
    return {**stats, "jobs": shown}


def newest_dead_letter(store: Store) -> dict[str, Any] | None:
    """The dead letter ``status`` quotes: the one dead-lettered last, else the oldest held.

    ``{"seq", "unit", "reference", "kind", "dead_at", "reason"}`` with ``reason`` Stora's
    refusal (:func:`gateway.outbox.drainer.refusal_text`), or ``None`` when none is held.  Two
    key lookups at most, however many are held.  Raises ``StoreError`` like any read.
    """
    marker = store.meta(NEWEST_DEAD_KEY)
    row = store.event(int(marker)) if marker and marker.isdigit() else None
    if row is None or row.state != "dead":  # retried or pruned since: any one held
        held = store.events(state="dead", limit=1)
        row = held[0] if held else None
    if row is None:
        return None
    error = row.as_dict()["error"] or {}
    return {"seq": row.seq, "unit": row.unit, "reference": row.reference, "kind": row.kind,
            "dead_at": error.get("dead_at"), "reason": refusal_text(error)}


def last_delivered_at(store: Store) -> float | None:
    """When Stora last accepted a Timeline Event (wall time), from the outbox; ``None``.

    Read from the database, not counted by the drainer, so it survives a restart.
    Raises :class:`~gateway.store.StoreError` like any store read.
    """
    return store.last_delivered_at()


# --------------------------------------------------------------------------- Prometheus


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family: name (with prefix), type, help and its samples.

    ``samples`` are ``(labels, value)``; a family with no samples is not written.
    """

    name: str
    kind: str  # "gauge" | "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: object, **labels: str) -> None:
        """Add a sample; ``None`` (unknown) adds nothing, a bool is 1 or 0."""
        number = _number(value)
        if number is not None:
            self.samples.append((labels, number))


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _timestamp(text: object) -> float | None:
    """Seconds since the epoch from an RFC 3339 string (``status`` times), or ``None``."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _section(status: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = status.get(name)
    return value if isinstance(value, Mapping) else {}


def metrics_from_status(status: Mapping[str, Any]) -> list[Metric]:
    """The metric families ``status`` (``Agent.status``) describes.

    Only what ``status`` holds: this is a rendering, not a second source of truth.
    """
    families: list[Metric] = []

    def metric(name: str, kind: str, text: str) -> Metric:
        m = Metric(METRIC_PREFIX + name, kind, text)
        families.append(m)
        return m

    metric("info", "gauge", "Always 1; the gateway's version and site as labels.").add(
        1, version=str(status.get("version", "")), site=str(status.get("site", "")))
    metric("online", "gauge", "1 while the agent runs (the retained status says online).").add(
        bool(status.get("online")))
    verdict = metric("verdict", "gauge",
                     "1 for the site's verdict (ok, degraded, down), 0 for the others.")
    if status.get("verdict") in VERDICTS:
        # Every state written (a state set): an alert on ``{verdict="down"} == 1`` then
        # sees a 0, not an absent series, when the site is well.
        for state in VERDICTS:
            verdict.add(status["verdict"] == state, verdict=state)
    metric("start_time_seconds", "gauge", "When the agent started, seconds since the epoch.").add(
        _timestamp(status.get("started_at")))
    metric("uptime_seconds", "gauge", "Seconds since the agent started.").add(
        status.get("uptime_s"))

    clock = _section(status, "clock")
    metric("clock_trusted", "gauge",
           "1 when the clock may judge command freshness (README: a clock you can trust).").add(
        clock.get("trusted"))
    metric("clock_synchronized", "gauge", "1 when the kernel reports time synchronization.").add(
        clock.get("synced"))

    broker = _section(status, "broker")
    metric("broker_connected", "gauge", "1 while the MQTT broker link is up.").add(
        broker.get("connected"))
    for key, text in (("connects", "Successful broker connections."),
                      ("connect_failures", "Failed broker connection attempts."),
                      ("disconnects", "Broker connections lost."),
                      ("liveness_failures", "Wedged broker connections detected."),
                      ("published", "Messages published."),
                      ("inbound_dropped", "Inbound messages dropped (queue full).")):
        metric(f"broker_{key}_total", "counter", text).add(broker.get(key))

    online = metric("controller_online", "gauge",
                    "1 when the controller answered at its last contact.")
    failures = metric("controller_consecutive_failures", "gauge",
                      "Failed exchanges with the controller since its last success.")
    controllers = status.get("controllers")
    for c in controllers if isinstance(controllers, list) else ():
        if isinstance(c, Mapping):
            name = str(c.get("name", ""))
            online.add(c.get("online"), controller=name)
            failures.add(c.get("consecutive_failures"), controller=name)

    outbox = _section(status, "outbox")
    metric("outbox_pending", "gauge", "Timeline Events waiting to be posted to Stora.").add(
        outbox.get("pending"))
    oldest = outbox.get("oldest_age_s")
    metric("outbox_oldest_age_seconds", "gauge",
           "Age of the oldest waiting Timeline Event (0 when none waits).").add(
        0 if oldest is None and "pending" in outbox else oldest)
    metric("outbox_dead_letters", "gauge",
           "Timeline Events Stora refused for good, held until a person retries them.").add(
        outbox.get("dead"))
    metric("outbox_last_delivery_timestamp_seconds", "gauge",
           "When Stora last accepted a Timeline Event, seconds since the epoch.").add(
        _timestamp(outbox.get("last_post_at")))
    drain = metric("outbox_drain_state", "gauge",
                   "1 for the drain's current state (ok, backing off, paused: …).")
    if isinstance(outbox.get("drain"), str):
        drain.add(1, state=outbox["drain"])
    for key, text in (("attempts", "POSTs sent to Stora."),
                      ("delivered", "Timeline Events Stora accepted."),
                      ("dead_lettered", "Timeline Events dead-lettered."),
                      ("events_refused", "Timeline Event records refused by the database.")):
        metric(f"outbox_{key}_total", "counter", text).add(outbox.get(key))

    commands = _section(status, "commands")
    for key, text in (("received", "Commands received on P/S/cmd."),
                      ("executed", "Commands executed."),
                      ("rejected", "Commands rejected."),
                      ("duplicates", "Commands answered as duplicates."),
                      ("shed", "Commands dropped unchecked under a flood.")):
        metric(f"commands_{key}_total", "counter", text).add(commands.get(key))
    by_reason = metric("commands_rejected_by_reason_total", "counter",
                       "Commands rejected, by reason code (contract §4).")
    reasons = commands.get("rejected_by_reason")
    for reason, count in sorted(reasons.items()) if isinstance(reasons, Mapping) else ():
        by_reason.add(count, reason=str(reason))

    host = _section(status, "host")
    metric("disk_free_bytes", "gauge",
           "Free bytes on the filesystem holding the state database.").add(
        host.get("disk_free_bytes"))
    metric("disk_size_bytes", "gauge", "Size of that filesystem in bytes.").add(
        host.get("disk_total_bytes"))
    metric("cpu_temperature_celsius", "gauge", "Hottest readable thermal zone.").add(
        host.get("cpu_temp_c"))
    metric("load1", "gauge", "1-minute load average.").add(host.get("load_1m"))
    metric("resident_memory_bytes", "gauge", "Resident memory of the agent process.").add(
        host.get("rss_bytes"))
    return [m for m in families if m.samples]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _lines(families: Iterable[Metric]) -> Iterator[str]:
    for m in families:
        if not _NAME.fullmatch(m.name) or m.kind not in ("gauge", "counter"):
            raise ValueError(f"bad metric {m.name!r} ({m.kind})")
        yield f"# HELP {m.name} {_escape_help(m.help)}"
        yield f"# TYPE {m.name} {m.kind}"
        for labels, value in m.samples:
            if any(not _LABEL.fullmatch(k) or k.startswith("__") for k in labels):
                raise ValueError(f"bad label name in {m.name}: {sorted(labels)}")
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            yield f"{m.name}{{{inner}}} {_format_value(value)}" if inner else \
                f"{m.name} {_format_value(value)}"


def render_prometheus(status: Mapping[str, Any]) -> str:
    """``status`` as Prometheus text exposition format 0.0.4 (ends with a newline)."""
    return "".join(line + "\n" for line in _lines(metrics_from_status(status)))


# --------------------------------------------------------------------------- textfile


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: readers see the old or the new file.

    The temporary file is ``.<name>.<random>.tmp`` beside it (same filesystem, so the
    rename is atomic; not ``*.prom``, so node_exporter never reads a partial one), made
    world-readable like the file it replaces, fsynced before the rename, and the
    directory fsynced after it.  Raises ``OSError``; nothing is left behind on failure.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            fp.write(text)
            fp.flush()
            os.fchmod(fp.fileno(), 0o644)  # mkstemp makes it 0600; the collector must read it
            os.fsync(fp.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # the rename is done; only its durability across a power cut is unsure
    try:
        os.fsync(dir_fd)
    except OSError:
        LOGGER.debug("fsync of %s failed", path.parent, exc_info=True)
    finally:
        os.close(dir_fd)
