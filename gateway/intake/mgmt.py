"""Remote management over MQTT: signed requests on ``P/S/mgmt`` (contract §4, §5).

A request is a command token like any other (same envelope, keys, site, freshness and
size checks, by :class:`~gateway.intake.commands.CommandVerifier` with ``kind="mgmt"``); its
``cmd`` names the request and its parameters travel in ``args``.  Results go to
``P/S/mgmt/result`` as ``{"jti","cmd","status","result","reason","duplicate","at"}``.

At most once, like commands
---------------------------
A verified request is claimed in the same ``commands`` table as commands, under
``cmd = "mgmt:<name>"``, before the MQTT delivery is acknowledged, and its result is
stored when it ends.  A re-sent ``jti`` is never run again: it gets the stored result
with ``"duplicate": true`` (or, while the first copy is still running, that copy's
result when it ends).  A request interrupted by a crash ends ``unknown`` at the next
start and is not re-run (a half-applied ``config.set`` or an interrupted ``locks.test``
must be looked at, not repeated blindly).  Requests run one at a time on their own
thread, so a ``locks.test`` never holds up the command path.

Statuses and reasons
--------------------
``done``; ``rejected`` with a contract §4 reason: every verification reason, plus
``malformed`` for bad ``args`` or an invalid configuration (``result.error`` says what
and where), ``unknown_unit`` for a unit that is not configured, ``stale_version`` when
``config.set`` names an ``expect_sha256`` that is no longer the file's; ``failed`` when
the request could not be carried out (``result.error``).

The requests and their ``args``
-------------------------------
``status``
    no args; the agent's status (the retained ``P/S/status`` payload).
``config.get``
    optional ``offset`` (characters, default 0); ``{"path", "sha256", "size", "offset",
    "toml", "next_offset"}``: the config file's text from ``offset`` (secrets are never
    in the file, only the paths of their files), at most :data:`CONFIG_CHUNK_CHARS`
    characters of it as JSON, and the SHA-256 of the whole file's bytes.  A large site's
    file (a few hundred locks passes 64 KiB) comes in pages so that no answer can exceed
    the broker's packet limit; ``next_offset`` is ``null`` on the last page.  Join the
    pages, check the hash, edit, and send the text back with ``config.set``.
``config.set``
    ``toml`` (the whole new file, UTF-8, at most 40 KiB; a management request may be
    60 KiB, :data:`~gateway.intake.commands.MAX_MGMT_BYTES`), optional ``expect_sha256``.
    The text is validated exactly as at start (``check-config``), in memory and against
    the directory the file is named in; an invalid one is ``rejected``/``malformed``
    with the file's error and the old file and config stay.  Only the settings in
    :data:`REMOTE_SETTINGS` may change (:func:`protected_changes`): timings, rate limits,
    telemetry, the app name, and freshness only tighter.  Trust, endpoints, credentials,
    state, and the site's physical wiring (locks' controller, channel, device,
    energize_to, inputs and references; controllers' driver, port, address, broker) are
    changed on the gateway itself.  A valid one is written atomically (temporary file in
    the same directory, fsync, rename, fsync of the directory) with the old file's mode;
    when the config path is a symbolic link (``/etc/stora-gateway/gateway.toml`` in
    ``deploy/``) the file it points to is replaced and the link is kept.  Every accepted
    change raises a ``config_changed`` alarm and queues a "Gateway configuration changed
    via {app_name}" Timeline Event, then is applied (see
    :meth:`gateway.agent.Agent.apply_config`: ``[commands]`` and ``[telemetry]`` live,
    anything else by a clean restart, refused within :data:`RESTART_MIN_UPTIME_S` of a
    start): ``result`` is ``{"sha256", "previous_sha256", "changed", "applied": "live" |
    "restart"}``.
``locks.test``
    ``units`` (a list of unit ids or references) or ``all: true``; optional
    ``seconds`` (0.2–30, default 1) and ``relock_timeout`` (1–60, default 10).  The
    technician's test cycle (contract §2 ``test``), audited the same way; ``result`` is
    the pass/fail table.  Units in lockout are not tested.
``outbox.retry``
    ``seq`` (one dead-lettered event) or ``all_dead: true``.
``state.republish``
    no args; every unit's retained state and the status are published again.
``clock.reset_floor``
    no args; the trusted-time floor goes back to the build date (the same as the
    technician's ``clock --reset-floor``, gateway/clock.py), logged and alarmed with the
    request's actor; ``result`` says the previous floor and the new one.
``log.level``
    ``level``: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``; the agent's log level
    from now until the next change or restart; ``result`` gives the previous one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.intake.commands import MAX_MGMT_BYTES, Command, CommandVerifier, Rejection
from gateway.intake.screen import Screen
from sitelink.codes import MgmtCmd, Reason, Status
from sitelink.payloads import mgmt_result_payload

if TYPE_CHECKING:
    from gateway.agent import Agent

LOGGER = logging.getLogger(__name__)

#: How management requests are told apart from commands in the ``commands`` table.
MGMT_PREFIX: Final = "mgmt:"
#: ``config.set``: the largest file accepted.  A request is at most
#: :data:`~gateway.intake.commands.MAX_MGMT_BYTES` as a token (base64url: 4/3 of the claims).
MAX_CONFIG_BYTES: Final = 40 * 1024
#: ``config.set`` that needs a restart is refused this soon after a start: each restart
#: counts towards the unit's StartLimitBurst=5 in 300 s, which a series of requests
#: must never exhaust (the unit would stay "failed" until someone is on site).
RESTART_MIN_UPTIME_S = 90.0
#: ``config.get``: the most characters of the file's text one answer carries, counted as
#: JSON (escaped quotes and newlines count double).  With the rest of the answer this
#: stays far below the broker's ``max_packet_size`` (64 KiB in deploy/) and the link's
#: own cap, whatever the file holds.
CONFIG_CHUNK_CHARS: Final = 32 * 1024
#: ``log.level``: the levels a remote operator may choose.
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


#: What a signed ``config.set`` may change, by the setting paths of :func:`settings`
#: (``*`` stands for any lock's unit id or controller's name).  An allow-list: a setting
#: added later is on-site only until someone decides otherwise here.
REMOTE_SETTINGS: Final = frozenset({
    "site.app_name",
    "mqtt.keepalive_s",
    "commands.clock_skew_s", "commands.max_lifetime_s",  # only to tighten them
    "stora.max_per_second", "stora.max_per_minute",
    "telemetry.interval_s",
    "locks[*].unlock_seconds",
    "controllers[*].timeout_ms", "controllers[*].retries",
})
#: Remote changes to these may only make them smaller: stricter freshness, and no more
#: load on Stora than the site was given.
_TIGHTEN_ONLY: Final = frozenset({"commands.clock_skew_s", "commands.max_lifetime_s",
                                  "stora.max_per_second", "stora.max_per_minute"})
#: How far a remote change may go, so that one signed request cannot lock the relay out
#: (found in review): the relay signs lockouts and clears for up to 300 s (contract
#: §7.3), and under 5 s of skew a relay whose clock is a few seconds off is refused.  An
#: unlock held longer than 5 minutes by default is a site decision, not a remote one.
_REMOTE_BOUNDS: Final = {
    "commands.max_lifetime_s": (300, None),
    "commands.clock_skew_s": (5, None),
    "locks[*].unlock_seconds": (None, 300),
}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}``; lists stay whole values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings(config: Any) -> dict[str, Any]:
    """Every setting of ``config`` by a path that does not depend on the file's order.

    ``{"mqtt.host": …, "locks[unit_a101]": True, "locks[unit_a101].channel": 0,
    "controllers[bus1].port": …}``: locks by unit id, controllers by name, each with a
    presence entry, so adding or removing one is a change of its own and moving a
    ``[[locks]]`` table within the file is none.
    """
    out: dict[str, Any] = {}
    for section, value in config.redacted().items():
        if section in ("locks", "controllers"):
            id_key = "unit" if section == "locks" else "name"
            for item in value:
                where = f"{section}[{item[id_key]}]"
                out[where] = True
                out.update(_flatten({k: v for k, v in item.items() if k != id_key}, where))
        elif section != "path":
            out.update(_flatten(value, section))
    return out


def protected_changes(old: Any, new: Any) -> list[str]:
    """The settings ``config.set`` may not change: all but :data:`REMOTE_SETTINGS`.

    A management request is signed by a command key; a stolen or misused one must not be
    able to add keys, loosen freshness, point Stora or the broker at another host, move
    the state, or rewire the site.  Found in review: lock wiring (``controller``,
    ``channel``, ``device``, ``energize_to``, the door and status inputs) and bus
    endpoints were accepted remotely, so flipping ``energize_to`` made "locked"
    physically open while the read-back said locked, and swapping two channels made a
    tenant's unlock open another unit with a false audit trail.  The physical wiring,
    references (the labels on the doors), endpoints, trust and state are changed on the
    gateway itself (``check-config``, a local edit).
    """
    before, after = settings(old), settings(new)
    refused = []
    for path in sorted(set(before) | set(after)):
        was, now = before.get(path), after.get(path)
        if was == now:
            continue
        pattern = path
        if path.startswith(("locks[", "controllers[")) and "]." in path:
            section, rest = path.split("[", 1)
            pattern = f"{section}[*].{rest.split('].', 1)[1]}"
        allowed = pattern in REMOTE_SETTINGS
        if allowed and pattern in _TIGHTEN_ONLY:
            allowed = (isinstance(was, int) and isinstance(now, int) and now < was)
        if not allowed:
            refused.append(path if path in before and path in after
                           else f"{path} ({'added' if path in after else 'removed'})")
            continue
        low, high = _REMOTE_BOUNDS.get(pattern, (None, None))
        if isinstance(now, int) and low is not None and now < low:
            refused.append(f"{path} (remotely at least {low})")
        elif isinstance(now, int) and high is not None and now > high:
            refused.append(f"{path} (remotely at most {high})")
    return refused


class RequestError(Exception):
    """A request that cannot be carried out as asked: ``status`` with a contract reason."""

    def __init__(self, status: Status, reason: Reason | None, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.reason = reason
        self.error = error


def _bad_args(error: str) -> RequestError:
    return RequestError(Status.REJECTED, Reason.MALFORMED, error)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as fp:
        return hashlib.sha256(fp.read()).hexdigest()


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, whole.

    Temporary file in the same directory (same filesystem, so the rename is atomic),
    fsync, rename, fsync of the directory (so the rename survives a power cut).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Management:
    """Verifies, records, runs and answers management requests for one agent."""

    def __init__(self, agent: Agent, *, restart_min_uptime_s: float | None = None) -> None:
        """``restart_min_uptime_s`` replaces :data:`RESTART_MIN_UPTIME_S` (a test of a
        restart cannot wait 90 s; the dev kit gives it)."""
        self.agent = agent
        self.restart_min_uptime_s = (RESTART_MIN_UPTIME_S if restart_min_uptime_s is None
                                     else restart_min_uptime_s)
        #: Shared with commands: the rejection-result bucket; not the refusal cache (the
        #: same bytes may be a valid command and a malformed request).
        self.counters = {"received": 0, "done": 0, "rejected": 0, "failed": 0,
                         "duplicates": 0, "refused_again": 0, "shed": 0}
        self.screen = Screen(CommandVerifier(agent.config, agent.clock, kind="mgmt"),
                             agent.rejections, max_bytes=MAX_MGMT_BYTES,
                             counters=self.counters)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mgmt")
        self._running: dict[str, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._handlers: dict[str, Callable[[Command], dict[str, Any]]] = {
            MgmtCmd.STATUS: self._status,
            MgmtCmd.CONFIG_GET: self._config_get,
            MgmtCmd.CONFIG_SET: self._config_set,
            MgmtCmd.LOCKS_TEST: self._locks_test,
            MgmtCmd.OUTBOX_RETRY: self._outbox_retry,
            MgmtCmd.STATE_REPUBLISH: self._state_republish,
            MgmtCmd.LOG_LEVEL: self._log_level,
            MgmtCmd.CLOCK_RESET_FLOOR: self._clock_reset_floor,
        }
        self._stopped = False

    @property
    def verifier(self) -> CommandVerifier:
        """The verifier of management requests (the agent's keys and site)."""
        return self.screen.verifier

    def reconfigure(self) -> None:
        """The agent's configuration changed: verify with its new keys and site."""
        self.screen.reset(CommandVerifier(self.agent.config, self.agent.clock, kind="mgmt"))

    def stop(self) -> None:
        """Let a running request end; queued ones are dropped (they stay claimed and end
        ``unknown`` at the next start)."""
        self._stopped = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- receiving --------------------------------------------------------------------
    def on_message(self, message: Any) -> None:
        """A message on ``P/S/mgmt`` (the link's worker thread): verify, claim, queue."""
        from gateway.store import StoreError

        if self._stopped:  # shutting down: unacknowledged, the broker delivers it again
            return
        self._count("received")
        verdict = self.screen.check(message.payload, retained=bool(message.retain))
        if verdict is None:
            return  # shed: results are throttled anyway (gateway/intake/screen.py)
        if isinstance(verdict, Rejection):
            self._rejected(verdict)
            return
        request = verdict
        try:
            with self.agent.store.transaction() as tx:
                fresh = tx.claim_command(request.jti, MGMT_PREFIX + request.cmd, request.unit,
                                         time.time())
                first = None if fresh else tx.command(request.jti)
        except StoreError as exc:
            # Without a durable claim at-most-once cannot be promised: refuse.
            self._answer(request.jti, request.cmd, Status.FAILED, None,
                         {"error": f"storage: {exc}"})
            return
        if first is not None:
            self._duplicate(request, first)
            return
        with self._lock:
            future = self._pool.submit(self._run, request)
            self._running[request.jti] = future
        future.add_done_callback(functools.partial(self._forget, request.jti))

    def _forget(self, jti: str, future: Future[dict[str, Any]]) -> None:
        del future
        with self._lock:
            self._running.pop(jti, None)

    def _count(self, what: str) -> None:
        with self._lock:  # the link's worker and the management thread both count
            self.counters[what] = self.counters.get(what, 0) + 1

    def _rejected(self, rejection: Rejection) -> None:
        from gateway.store import StoreError

        # Debug only, as for commands: a flood would write a line per message; the
        # counts are in `status`.
        LOGGER.debug("management request rejected: %s", rejection)
        if not self.agent.rejections.take():
            # Throttled: nothing would be published, so no database lookup either (a
            # flood of one captured, expired request must not cost a query each).
            self._count("rejected")
            return
        if rejection.claims_verified and rejection.jti is not None:
            try:
                row = self.agent.store.command(rejection.jti)
            except StoreError:
                row = None
            if row is not None and row.result and row.cmd.startswith(MGMT_PREFIX):
                # An expired re-send of a request already answered: its result again,
                # within the same bucket as every rejection (no amplification).
                self._count("duplicates")
                self._publish(_stored_payload(row))
                return
        self._count("rejected")
        # Unverified ids are the sender's word: never echoed (see
        # gateway.agent.rejection_outcome).
        verified = rejection.claims_verified
        self._publish(self._payload(rejection.jti if verified else None,
                                    rejection.cmd if verified else None, Status.REJECTED,
                                    rejection.reason, None))

    def _duplicate(self, request: Command, first: Any) -> None:
        self._count("duplicates")
        if not first.cmd.startswith(MGMT_PREFIX):
            # The id of a command, reused for a management request: never run it.
            self._publish(self._payload(request.jti, request.cmd, Status.REJECTED,
                                        Reason.MALFORMED,
                                        {"error": "this jti was already used by a command"},
                                        duplicate=True))
            return
        with self._lock:
            running = self._running.get(request.jti)
        if running is not None:
            running.add_done_callback(
                lambda f: self._publish({**f.result(), "duplicate": True})
                if not f.cancelled() and f.exception() is None else None)
            return
        if first.result:
            self._publish(_stored_payload(first))

    # -- running ----------------------------------------------------------------------
    def _run(self, request: Command) -> dict[str, Any]:
        handler = self._handlers[request.cmd]
        now, skew = self.agent.clock.now(), self.agent.config.commands.clock_skew_s
        if now >= request.exp + skew:
            # Fresh when it arrived, expired while it waited behind another request (a
            # long locks.test): never run late, like a command (contract §5).
            return self._answer(request.jti, request.cmd, Status.REJECTED, Reason.EXPIRED,
                                {"error": f"expired while waiting: now {now:.0f} >= exp "
                                          f"{request.exp} + skew {skew}"})
        LOGGER.info("management request %s: %s", request.jti, request.cmd)
        try:
            result = handler(request)
            status: Status = Status.DONE
            reason: Reason | None = None
        except RequestError as exc:
            status, reason, result = exc.status, exc.reason, {"error": exc.error}
        except Exception as exc:  # a bug or a failing part: answered, never silent
            LOGGER.exception("management request %s (%s) failed", request.jti, request.cmd)
            status, reason = Status.FAILED, None
            result = {"error": f"{type(exc).__name__}: {exc}"}
        payload = self._answer(request.jti, request.cmd, status, reason, result)
        if (status == Status.DONE and request.cmd == MgmtCmd.CONFIG_SET
                and result.get("applied") == "restart"):
            self.agent.request_restart(f"config.set {request.jti}")
        return payload

    def _answer(self, jti: str, cmd: str, status: Status, reason: Reason | None,
                result: Any, *, store: bool = True) -> dict[str, Any]:
        payload = self._payload(jti, cmd, status, reason, result)
        self._count(status)
        if store:
            try:
                with self.agent.store.transaction() as tx:
                    tx.finish_command(jti, status, reason, payload)
            except Exception:  # the answer still goes out; a re-send gets `unknown` later
                LOGGER.exception("could not record the result of management request %s", jti)
        self._publish(payload)
        return payload

    @staticmethod
    def _payload(jti: str | None, cmd: str | None, status: Status | str,
                 reason: Reason | str | None, result: Any, *,
                 duplicate: bool = False) -> dict[str, Any]:
        return mgmt_result_payload(jti, cmd, status, reason, result, duplicate=duplicate,
                                   at=time.time())

    def _publish(self, payload: Mapping[str, Any]) -> None:
        from gateway.link.wire import publish_packet_size

        topic = self.agent.topics.mgmt_result
        data = json.dumps(payload, separators=(",", ":"), default=str).encode()
        cap = self.agent.config.mqtt.max_packet_bytes
        if publish_packet_size(topic, len(data), 1) > cap:
            # Found in review: a large answer (a locks.test of every lock on a big site)
            # was refused by the link and looked like "broker not connected".
            payload = _shrunk(payload, len(data), cap)
            data = json.dumps(payload, separators=(",", ":"), default=str).encode()
        if not self.agent.link.publish(topic, data, qos=1):
            LOGGER.warning("management result %s not sent: broker not connected (a re-send "
                           "of the request gets it)", payload.get("jti"))

    # -- the requests -----------------------------------------------------------------
    @staticmethod
    def _no_args(request: Command) -> None:
        if request.args:
            raise _bad_args(f"{request.cmd} takes no args; got {sorted(request.args)}")

    def _status(self, request: Command) -> dict[str, Any]:
        self._no_args(request)
        return self.agent.status()

    def _config_get(self, request: Command) -> dict[str, Any]:
        args = request.args
        unknown = set(args) - {"offset"}
        if unknown:
            raise _bad_args(f"unknown args for config.get: {sorted(unknown)}")
        offset = args.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise _bad_args("offset must be a whole number of characters, 0 or more")
        path = Path(self.agent.config.path)
        data = path.read_bytes()
        text = data.decode("utf-8")  # it loaded as a config, so it is UTF-8
        if offset > len(text):
            raise _bad_args(f"offset {offset} is past the end of the file ({len(text)} "
                            "characters)")
        end = config_page_end(text, offset)
        return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(text), "offset": offset, "toml": text[offset:end],
                "next_offset": end if end < len(text) else None}

    def _config_set(self, request: Command) -> dict[str, Any]:
        from gateway.config import parse_config_bytes
        from gateway.errors import ConfigError

        args = request.args
        unknown = set(args) - {"toml", "expect_sha256"}
        if unknown:
            raise _bad_args(f"unknown args for config.set: {sorted(unknown)}")
        text = args.get("toml")
        if not isinstance(text, str) or not text.strip():
            raise _bad_args("config.set needs 'toml': the whole new config file as text")
        data = text.encode("utf-8")
        if len(data) > MAX_CONFIG_BYTES:
            raise _bad_args(f"the config is {len(data)} bytes, over {MAX_CONFIG_BYTES}")
        named = Path(self.agent.config.path)
        # deploy/: /etc/stora-gateway (root's) holds a link to the file in a directory
        # the agent may write; the file is replaced there, the link stays.
        real = Path(os.path.realpath(named))
        current = file_sha256(real)
        expected = args.get("expect_sha256")
        if expected is not None and expected != current:
            raise RequestError(Status.REJECTED, Reason.STALE_VERSION,
                               f"the config file's sha256 is {current}, not {expected}: "
                               "it changed since it was read; get it again")
        # Validated in memory against the directory the file is named in, so relative
        # *_file paths and the secret-file checks resolve exactly as at the next start.
        try:
            new = parse_config_bytes(data, str(named), named.absolute().parent)
        except ConfigError as exc:
            raise _bad_args(f"invalid config: {exc.key or 'file'}: {exc.reason}; "
                            "the current config is kept") from None
        if new.site.id != self.agent.config.site.id:
            raise _bad_args(f"site.id cannot be changed remotely ({self.agent.config.site.id!r}"
                            f" to {new.site.id!r}); the current config is kept")
        refused = protected_changes(self.agent.config, new)
        if refused:
            raise _bad_args(f"these settings can only be changed on the gateway itself: "
                            f"{', '.join(refused[:8])}{' …' if len(refused) > 8 else ''}; "
                            "the current config is kept")
        uptime = time.time() - self.agent.started_at
        min_uptime = self.restart_min_uptime_s
        if self.agent.needs_restart(new) and uptime < min_uptime:
            raise RequestError(Status.FAILED, None,
                               f"this change needs a restart and the agent started "
                               f"{uptime:.0f} s ago; try again in "
                               f"{min_uptime - uptime:.0f} s (restarts are "
                               "rate-limited); the current config is kept")
        write_atomically(real, data, real.stat().st_mode & 0o777)
        digest = hashlib.sha256(data).hexdigest()
        LOGGER.warning("config.set %s: %s written (sha256 %s)", request.jti, real, digest)
        changed, applied = self.agent.apply_config(new)
        self._audit_change(request, changed, digest)
        return {"sha256": digest, "previous_sha256": current, "changed": changed,
                "applied": applied}

    def _audit_change(self, request: Command, changed: list[str], digest: str) -> None:
        """A ``config_changed`` alarm and a Timeline Event for an accepted ``config.set``.

        Staff see in Stora that the gateway's settings changed, when and by whom, next to
        the unlocks those settings govern; the external id is the request's, so a crash
        and a replay can never record it twice.
        """
        from gateway.outbox.timeline import external_id_for, make_event
        from gateway.store import StoreError

        actor = f"remote {request.actor or request.kid}"
        what = f"sections {', '.join(changed) or 'none'}; sha256 {digest[:12]}"
        self.agent.alarm("config_changed", None,
                         f"config.set {request.jti} by {actor}: {what}")
        config = self.agent.config
        try:
            with self.agent.store.transaction() as tx:
                tx.add_event(make_event(
                    "config_changed", app_name=config.site.app_name, site_id=config.site.id,
                    unit="", reference="", occurred_at=time.time(), actor=actor,
                    external_id=external_id_for(config.site.id, "config.set", request.jti),
                    detail=f"{what}; by {actor}"))
        except StoreError as exc:  # the alarm went out; the store's hook alarms as well
            LOGGER.error("config.set %s: the Timeline Event was not queued: %s",  # noqa: TRY400
                         request.jti, exc)

    def _locks_test(self, request: Command) -> dict[str, Any]:
        from gateway.ops.control import ControlError
        from gateway.ops.technician import TEST_RELOCK_TIMEOUT, TEST_SECONDS, check_test_timing

        args = dict(request.args)
        unknown = set(args) - {"units", "all", "seconds", "relock_timeout"}
        if unknown:
            raise _bad_args(f"unknown args for locks.test: {sorted(unknown)}")
        units = args.get("units")
        if args.get("all") is True:
            if units is not None:
                raise _bad_args("give 'units' or 'all', not both")
        elif not (isinstance(units, (list, tuple)) and units
                  and all(isinstance(u, str) for u in units)):
            raise _bad_args("locks.test needs 'units' (a list of unit ids or references) "
                            "or 'all': true")
        try:
            for name, bounds in (("seconds", TEST_SECONDS),
                                 ("relock_timeout", TEST_RELOCK_TIMEOUT)):
                check_test_timing(name, args.get(name), bounds)
        except ValueError as exc:
            raise _bad_args(str(exc)) from None
        params = {"all": args.get("all") is True, "units": list(units or ()),
                  "seconds": args.get("seconds"), "relock_timeout": args.get("relock_timeout")}
        actor = f"remote {request.actor or request.kid}"
        try:
            return self.agent._test(params, actor)
        except ControlError as exc:
            raise RequestError(Status.REJECTED, Reason.UNKNOWN_UNIT, str(exc)) from None

    def _outbox_retry(self, request: Command) -> dict[str, Any]:
        from gateway.ops.control import ControlError

        args = request.args
        unknown = set(args) - {"seq", "all_dead"}
        if unknown:
            raise _bad_args(f"unknown args for outbox.retry: {sorted(unknown)}")
        params: dict[str, Any] = {}
        if args.get("all_dead") is True and "seq" not in args:
            params["all_dead"] = True
        elif isinstance(args.get("seq"), int) and not isinstance(args.get("seq"), bool) \
                and "all_dead" not in args:
            params["seq"] = args["seq"]
        else:
            raise _bad_args("outbox.retry needs 'seq' (an event number) or 'all_dead': true")
        try:
            return self.agent._outbox_retry(params, f"remote {request.actor or request.kid}")
        except ControlError as exc:
            raise _bad_args(str(exc)) from None

    def _state_republish(self, request: Command) -> dict[str, Any]:
        self._no_args(request)
        self.agent.units.republish()
        self.agent.publish_telemetry()
        return {"units": len(self.agent.config.locks)}

    def _clock_reset_floor(self, request: Command) -> dict[str, Any]:
        self._no_args(request)
        return self.agent.reset_clock_floor(f"remote {request.actor or request.kid}")

    def _log_level(self, request: Command) -> dict[str, Any]:
        args = request.args
        level = args.get("level")
        if set(args) != {"level"} or not isinstance(level, str) or level.upper() not in LOG_LEVELS:
            raise _bad_args(f"log.level needs 'level', one of {', '.join(LOG_LEVELS)}")
        root = logging.getLogger()
        previous = logging.getLevelName(root.level)
        root.setLevel(level.upper())
        LOGGER.warning("log level %s -> %s by management request %s", previous, level.upper(),
                       request.jti)
        return {"level": level.upper(), "previous": previous}


def config_page_end(text: str, offset: int, limit: int = CONFIG_CHUNK_CHARS) -> int:
    """Where the ``config.get`` page of ``text`` starting at ``offset`` ends: as far as
    its JSON encoding (``ensure_ascii``, as the answer is sent) stays within ``limit``.

    The encoded length only grows with the end, so a binary search finds it in a few
    dozen encodings of at most ``limit`` characters, however large the file.
    """
    def fits(end: int) -> bool:
        return len(json.dumps(text[offset:end])) - 2 <= limit

    lo, hi = offset, min(len(text), offset + limit)  # no character encodes to less than 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shrunk(payload: Mapping[str, Any], size: int, cap: int) -> dict[str, Any]:
    """``payload`` with its ``result`` cut to the top-level scalars (``passed``, counts,
    hashes) and a note saying the full answer did not fit the broker's packet limit."""
    result = payload.get("result")
    kept: dict[str, Any] = {}
    if isinstance(result, Mapping):
        kept = {k: v for k, v in result.items()
                if v is None or isinstance(v, bool | int | float)
                or (isinstance(v, str) and len(v) <= 200)}
    kept["omitted"] = (f"the full result is {size} bytes, over mqtt.max_packet_bytes "
                       f"({cap}); ask for less (fewer units, a config.get offset)")
    return {**payload, "result": kept}


def _stored_payload(row: Any) -> dict[str, Any]:
    """The stored result of a request, as a duplicate.

    A request interrupted by a restart was stored as ``unknown`` by the store in the
    shape of a command result; it is answered in the management shape all the same.
    """
    result = row.result
    if "result" in result:
        return {**result, "duplicate": True}
    return Management._payload(row.jti, row.cmd.removeprefix(MGMT_PREFIX), row.status,
                               row.reason, None, duplicate=True)
