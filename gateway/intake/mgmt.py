"""Remote management over MQTT: signed requests on ``P/S/mgmt`` (contract §4, §5).

:class:`Management` verifies, claims (at most once, like commands), runs one at a time
and answers each request on ``P/S/mgmt/result``; what a request does is asked of its
:class:`~gateway.intake.mgmt_host.ManagementHost` (the operations service,
gateway/ops/service.py), so this module never imports the agent.  The requests, their
``args``, statuses and reasons: see docs/design/agent.md ("Remote management").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from gateway.config import parse_config_bytes
from gateway.errors import ConfigError
from gateway.intake.commands import MAX_MGMT_BYTES, Command, CommandVerifier, Rejection
from gateway.intake.mgmt_host import ManagementHost
from gateway.intake.remote_config import (
    MAX_CONFIG_BYTES,
    config_page_end,
    file_sha256,
    protected_changes,
    write_atomically,
)
from gateway.intake.screen import Screen
from gateway.link.message import Message
from gateway.link.wire import publish_packet_size
from gateway.outbox.timeline import external_id_for, make_event
from gateway.store import CommandRow, StoreError
from sitelink.codes import MgmtCmd, Reason, Status
from sitelink.payloads import mgmt_result_payload

LOGGER = logging.getLogger(__name__)

#: How management requests are told apart from commands in the ``commands`` table.
MGMT_PREFIX: Final = "mgmt:"
#: ``config.set`` that needs a restart is refused this soon after a start: each restart
#: counts towards the unit's StartLimitBurst=5 in 300 s, which a series of requests
#: must never exhaust (the unit would stay "failed" until someone is on site).
RESTART_MIN_UPTIME_S = 90.0
#: ``log.level``: the levels a remote operator may choose.
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


class RequestError(Exception):
    """A request that cannot be carried out as asked: ``status`` with a contract reason."""

    def __init__(self, status: Status, reason: Reason | None, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.reason = reason
        self.error = error


def _bad_args(error: str) -> RequestError:
    return RequestError(Status.REJECTED, Reason.MALFORMED, error)


class Management:
    """Verifies, records, runs and answers management requests for one agent."""

    def __init__(self, host: ManagementHost, *,
                 restart_min_uptime_s: float | None = None) -> None:
        """``restart_min_uptime_s`` replaces :data:`RESTART_MIN_UPTIME_S` (a test of a
        restart cannot wait 90 s; the dev kit gives it)."""
        self.host = host
        self.restart_min_uptime_s = (RESTART_MIN_UPTIME_S if restart_min_uptime_s is None
                                     else restart_min_uptime_s)
        #: Shared with commands: the rejection-result bucket; not the refusal cache (the
        #: same bytes may be a valid command and a malformed request).
        self.counters = {"received": 0, "done": 0, "rejected": 0, "failed": 0,
                         "duplicates": 0, "refused_again": 0, "shed": 0}
        self.screen = Screen(CommandVerifier(host.config, host.clock, kind="mgmt"),
                             host.rejections, max_bytes=MAX_MGMT_BYTES,
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
        self.screen.reset(CommandVerifier(self.host.config, self.host.clock, kind="mgmt"))

    def stop(self) -> None:
        """Let a running request end; queued ones are dropped (they stay claimed and end
        ``unknown`` at the next start)."""
        self._stopped = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- receiving --------------------------------------------------------------------
    def on_message(self, message: Message) -> None:
        """A message on ``P/S/mgmt`` (the link's worker thread): verify, claim, queue."""
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
            with self.host.store.transaction() as tx:
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
        # Debug only, as for commands: a flood would write a line per message; the
        # counts are in `status`.
        LOGGER.debug("management request rejected: %s", rejection)
        if not self.host.rejections.take():
            # Throttled: nothing would be published, so no database lookup either (a
            # flood of one captured, expired request must not cost a query each).
            self._count("rejected")
            return
        if rejection.claims_verified and rejection.jti is not None:
            try:
                row = self.host.store.command(rejection.jti)
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
        # gateway.ops.command_path.rejection_outcome).
        verified = rejection.claims_verified
        self._publish(self._payload(rejection.jti if verified else None,
                                    rejection.cmd if verified else None, Status.REJECTED,
                                    rejection.reason, None))

    def _duplicate(self, request: Command, first: CommandRow) -> None:
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
        now, skew = self.host.clock.now(), self.host.config.commands.clock_skew_s
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
            self.host.request_restart(f"config.set {request.jti}")
        return payload

    def _answer(self, jti: str, cmd: str, status: Status, reason: Reason | None,
                result: Any, *, store: bool = True) -> dict[str, Any]:
        payload = self._payload(jti, cmd, status, reason, result)
        self._count(status)
        if store:
            try:
                with self.host.store.transaction() as tx:
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
        topic = self.host.topics.mgmt_result
        data = json.dumps(payload, separators=(",", ":"), default=str).encode()
        cap = self.host.config.mqtt.max_packet_bytes
        if publish_packet_size(topic, len(data), 1) > cap:
            # Found in review: a large answer (a locks.test of every lock on a big site)
            # was refused by the link and looked like "broker not connected".
            payload = _shrunk(payload, len(data), cap)
            data = json.dumps(payload, separators=(",", ":"), default=str).encode()
        if not self.host.link.publish(topic, data, qos=1):
            LOGGER.warning("management result %s not sent: broker not connected (a re-send "
                           "of the request gets it)", payload.get("jti"))

    # -- the requests -----------------------------------------------------------------
    @staticmethod
    def _no_args(request: Command) -> None:
        if request.args:
            raise _bad_args(f"{request.cmd} takes no args; got {sorted(request.args)}")

    def _status(self, request: Command) -> dict[str, Any]:
        self._no_args(request)
        return self.host.status()

    def _config_get(self, request: Command) -> dict[str, Any]:
        args = request.args
        unknown = set(args) - {"offset"}
        if unknown:
            raise _bad_args(f"unknown args for config.get: {sorted(unknown)}")
        offset = args.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise _bad_args("offset must be a whole number of characters, 0 or more")
        path = Path(self.host.config.path)
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
        named = Path(self.host.config.path)
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
        if new.site.id != self.host.config.site.id:
            raise _bad_args(f"site.id cannot be changed remotely ({self.host.config.site.id!r}"
                            f" to {new.site.id!r}); the current config is kept")
        refused = protected_changes(self.host.config, new)
        if refused:
            raise _bad_args(f"these settings can only be changed on the gateway itself: "
                            f"{', '.join(refused[:8])}{' …' if len(refused) > 8 else ''}; "
                            "the current config is kept")
        uptime = time.time() - self.host.started_at
        min_uptime = self.restart_min_uptime_s
        if self.host.needs_restart(new) and uptime < min_uptime:
            raise RequestError(Status.FAILED, None,
                               f"this change needs a restart and the agent started "
                               f"{uptime:.0f} s ago; try again in "
                               f"{min_uptime - uptime:.0f} s (restarts are "
                               "rate-limited); the current config is kept")
        write_atomically(real, data, real.stat().st_mode & 0o777)
        digest = hashlib.sha256(data).hexdigest()
        LOGGER.warning("config.set %s: %s written (sha256 %s)", request.jti, real, digest)
        changed, applied = self.host.apply_config(new)
        self._audit_change(request, changed, digest)
        return {"sha256": digest, "previous_sha256": current, "changed": changed,
                "applied": applied}

    def _audit_change(self, request: Command, changed: list[str], digest: str) -> None:
        """A ``config_changed`` alarm and a Timeline Event for an accepted ``config.set``.

        Staff see in Stora that the gateway's settings changed, when and by whom, next to
        the unlocks those settings govern; the external id is the request's, so a crash
        and a replay can never record it twice.
        """
        actor = f"remote {request.actor or request.kid}"
        what = f"sections {', '.join(changed) or 'none'}; sha256 {digest[:12]}"
        self.host.alarm("config_changed", None,
                        f"config.set {request.jti} by {actor}: {what}")
        config = self.host.config
        try:
            with self.host.store.transaction() as tx:
                tx.add_event(make_event(
                    "config_changed", app_name=config.site.app_name, site_id=config.site.id,
                    unit="", reference="", occurred_at=time.time(), actor=actor,
                    external_id=external_id_for(config.site.id, "config.set", request.jti),
                    detail=f"{what}; by {actor}"))
        except StoreError as exc:  # the alarm went out; the store's hook alarms as well
            LOGGER.error("config.set %s: the Timeline Event was not queued: %s",  # noqa: TRY400
                         request.jti, exc)

    def _locks_test(self, request: Command) -> dict[str, Any]:
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
        # The timings are checked by the host (a refusal is ``malformed``), the units
        # while testing (a unit that is not configured is ``unknown_unit``).
        params = {"all": args.get("all") is True, "units": list(units or ()),
                  "seconds": args.get("seconds"), "relock_timeout": args.get("relock_timeout")}
        return self.host.remote_locks_test(params, f"remote {request.actor or request.kid}")

    def _outbox_retry(self, request: Command) -> dict[str, Any]:
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
        return self.host.remote_outbox_retry(params, f"remote {request.actor or request.kid}")

    def _state_republish(self, request: Command) -> dict[str, Any]:
        self._no_args(request)
        self.host.republish_state()
        return {"units": len(self.host.config.locks)}

    def _clock_reset_floor(self, request: Command) -> dict[str, Any]:
        self._no_args(request)
        return self.host.reset_clock_floor(f"remote {request.actor or request.kid}")

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


def _stored_payload(row: CommandRow) -> dict[str, Any]:
    """The stored result of a request, as a duplicate.

    A request interrupted by a restart was stored as ``unknown`` by the store in the
    shape of a command result; it is answered in the management shape all the same.
    """
    result = row.result
    if "result" in result:
        return {**result, "duplicate": True}
    return Management._payload(row.jti, row.cmd.removeprefix(MGMT_PREFIX), row.status,
                               row.reason, None, duplicate=True)
