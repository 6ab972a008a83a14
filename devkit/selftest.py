"""``stora-gateway selftest UNIT``: the whole path on site, with a real signed command.

Each step proves one link of broker → agent → lock → Timeline, and the table says
which one broke:

1. **broker**: connect to the ``[mqtt]`` broker with the self-test's own account and
   subscribe to the agent's status, results and the unit's state;
2. **agent**: its retained ``P/S/status`` says online;
3. **command**: an unlock of UNIT for ``--seconds``, signed with the self-test key and
   published on ``P/S/cmd`` (QoS 1, the broker must accept it); the agent's result;
4. **unlocked** / **relocked**: the unit's published state (``P/S/units/<unit>``)
   shows it unlocked, then locked again after the unlock time;
5. **timeline unlock** / **timeline relock**: the two Timeline Events, read from the
   agent's outbox (:class:`gateway.store.Store`, opened read-only): delivered to Stora,
   or still queued (with the last error), or refused (dead letter, with Stora's reason).

Exit 0 when every step passed, 1 when one failed (the table says which), 2 on bad
usage (an unknown unit, no key, the agent's own broker account).

**The self-test key.**  Until the relay can be asked to send a command, the self-test
signs one itself (:class:`devkit.signer.CommandSigner`, dev kit) with a key of its own:
``selftest --new-key FILE`` writes one (mode 0600) and prints the line to add to
``[commands] trusted_keys`` under the key id ``selftest``.  The agent treats it like the
relay's key: **whoever holds the file can open every door of the site** while the agent
trusts it.  So it is a commissioning tool: keep the file on the technician's laptop or
in root's home, and remove the ``selftest`` entry from ``trusted_keys`` (and the file)
when the site is handed over; every run says so, and ``status`` stays DEGRADED
(``commissioning_key_trusted``, gateway/ops/health.py) while the agent trusts it.  A
separate key id limits the damage (revoking it never touches the relay's keys, and the
audit trail names it), but the agent does not restrict what a trusted key may do: that
would be a change of the command contract, which the relay's own site check will make
unnecessary.

**Its broker account.**  The shipped ACL lets only the relay write ``P/S/cmd``; the
self-test needs an account of its own on the site broker (``gw-selftest``,
``deploy/README.md`` "Broker accounts") that may write the command topic and read the
agent's outputs.  Never the agent's account: the broker would disconnect the agent.
Over TLS the same goes for the client certificate: none, or its own
(``$STORA_GATEWAY_SELFTEST_TLS_CERT_FILE`` and ``$STORA_GATEWAY_SELFTEST_TLS_KEY_FILE``),
never the agent's (:func:`gateway.link.site_client.client_certificate`).

Dev kit: the CLI imports this module only inside the command.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from gateway.cli.watch import open_outbox, refusal_of
from gateway.errors import cap_text
from gateway.link.site_client import (
    BrokerAccount,
    ClientCertificate,
    SiteClient,
    SiteLinkError,
    client_certificate,
)
from gateway.ops import liveview
from gateway.ops.health import SELFTEST_KID
from gateway.term import plural

if TYPE_CHECKING:
    from devkit.signer import CommandSigner
    from gateway.config import Config, LockConfig
    from gateway.store import EventRow, Store

__all__ = ["SELFTEST_KID", "SelfTest", "new_key", "run_selftest"]

#: Environment variables for the self-test's account, password file and key file.
SELFTEST_USER_ENV: Final = "STORA_GATEWAY_SELFTEST_USERNAME"
SELFTEST_PASSWORD_ENV: Final = "STORA_GATEWAY_SELFTEST_PASSWORD_FILE"  # noqa: S105 (a name)
SELFTEST_KEY_ENV: Final = "STORA_GATEWAY_SELFTEST_KEY"
#: Environment variables naming the self-test's own TLS client certificate and its key,
#: for a broker that asks for one (never the agent's: gateway/link/site_client.py).
SELFTEST_CERT_ENV: Final = "STORA_GATEWAY_SELFTEST_TLS_CERT_FILE"
SELFTEST_TLS_KEY_ENV: Final = "STORA_GATEWAY_SELFTEST_TLS_KEY_FILE"
#: The account deploy/README.md proposes for the self-test on a broker with accounts.
SELFTEST_ACCOUNT: Final = "gw-selftest"
#: How long the retained ``P/S/status`` may take to arrive after subscribing: a broker
#: sends retained messages with the SUBACK, so this only covers a loaded link.
STATUS_WAIT_S: Final = 5.0
#: Lifetime of the signed unlock (``exp - iat``), and so the longest wait for its
#: result: the relay's lifetime for unlocks (contract §7.3), never more than the site's
#: ``max_lifetime_s``.
COMMAND_TTL_S: Final = 60
#: After the result, how long the published state may take to show the unlock: the
#: agent publishes the state before the result, so this only covers a slow link.
STATE_WAIT_S: Final = 5.0
#: On top of the unlock time, how long the relock may take: a reconciliation pass and a
#: self-relocking board's grace period (as the demo's ``RELOCK_MARGIN_S``).
RELOCK_MARGIN_S: Final = 8.0
#: Default wait for both Timeline Events to reach Stora (``--timeline-wait``): a post
#: takes well under a second; this leaves room for one retry after a transient error.
TIMELINE_WAIT_S: Final = 15.0
#: How often the outbox is read while waiting.
OUTBOX_POLL_S: Final = 0.1

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Step:
    """One line of the report."""

    step: str
    status: str
    seconds: float | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"step": self.step, "ok": self.status == PASS, "status": self.status,
                "elapsed_ms": None if self.seconds is None else round(self.seconds * 1000),
                "detail": self.detail}


# -- the key ------------------------------------------------------------------------------
def new_key(path: Path, kid: str = SELFTEST_KID) -> str:
    """Write a new Ed25519 key to ``path`` (0600, never over an existing file); return
    the ``trusted_keys`` entry for it (``kid = "<public key>"``)."""
    from cryptography.hazmat.primitives import serialization

    from devkit.signer import generate_keypair, public_key_text

    key, _ = generate_keypair()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise SiteLinkError(f"{path} exists; the self-test never overwrites a key: choose "
                            "another file", 2) from exc
    except OSError as exc:
        raise SiteLinkError(f"cannot create {path}: {exc.strerror or exc}", 2) from exc
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    return f'{kid} = "{public_key_text(key)}"'


def _signer(config: Config, key_file: Path, kid: str) -> CommandSigner:
    """The signer for ``kid``, after checking the config trusts exactly this key."""
    from devkit.signer import CommandSigner, load_private_key, public_key_text
    from gateway.errors import ConfigError

    try:
        key = load_private_key(key_file)
    except ConfigError as exc:
        raise SiteLinkError(str(exc), 2) from exc
    public = public_key_text(key)
    trusted = config.commands.trusted_keys.get(kid)
    if trusted is None:
        raise SiteLinkError(
            f"[commands] trusted_keys in {config.path} has no key {kid!r}: add "
            f'{kid} = "{public}" there (and restart the agent); remove it again once the '
            "site is commissioned", 2)
    if base64.urlsafe_b64encode(trusted).rstrip(b"=").decode() != public:
        raise SiteLinkError(f"the key in {key_file} is not the one [commands] trusted_keys "
                            f"lists as {kid!r}: its public key is {public}", 2)
    return CommandSigner(key, kid, config.site.id)


# -- what the broker says -------------------------------------------------------------------
class _Observer:
    """The agent's status, the results and the unit's states, as they arrive."""

    def __init__(self, prefix: str, unit: str) -> None:
        self.prefix = prefix
        self.unit = unit
        self.status: dict[str, Any] | None = None
        self.results: dict[str, dict[str, Any]] = {}
        #: Rejections without an id: the agent echoes no claim of a token whose
        #: signature it could not verify (``unknown_key``, ``bad_signature``, …).
        self.anonymous: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    @property
    def topics(self) -> list[str]:
        """Read by the self-test's account."""
        return [f"{self.prefix}/status", f"{self.prefix}/cmd/result",
                f"{self.prefix}/units/{self.unit}"]

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """paho's thread."""
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        suffix = topic[len(self.prefix) + 1:]
        with self.cond:
            if suffix == "status":
                self.status = doc
            elif suffix == "cmd/result" and isinstance(doc.get("jti"), str):
                self.results[doc["jti"]] = doc
            elif suffix == "cmd/result" and doc.get("jti") is None:
                self.anonymous.append(doc)
            elif suffix == f"units/{self.unit}":
                self.states.append(doc)
            self.cond.notify_all()

    def wait(self, check: Callable[[], Any], timeout: float) -> Any:
        """``check()`` (under the lock) once truthy, or its last value after ``timeout``."""
        with self.cond:
            return self.cond.wait_for(check, timeout)


# -- the test ---------------------------------------------------------------------------------
@dataclass
class SelfTest:
    """One run: the steps so far."""

    config: Config
    lock: LockConfig
    account: BrokerAccount
    seconds: int
    timeline_wait_s: float
    steps: list[Step] = field(default_factory=list)
    jti: str = field(default_factory=lambda: f"selftest-{uuid.uuid4().hex[:16]}")
    #: Called with each step as it ends (the table's lines, printed as they come).
    on_step: Callable[[Step], None] | None = None
    #: Its own TLS client certificate, for a broker that asks for one.
    certificate: ClientCertificate | None = None

    def add(self, step: str, status: str, started: float | None, detail: str) -> None:
        """Record a step; ``started`` is its ``time.monotonic()`` start."""
        seconds = None if started is None else time.monotonic() - started
        self.steps.append(Step(step, status, seconds, detail))
        if self.on_step is not None:
            self.on_step(self.steps[-1])

    def skip(self, *names: str) -> None:
        """The steps that could not run after a failure."""
        for name in names:
            self.add(name, SKIP, None, "not run: an earlier step failed")

    @property
    def ok(self) -> bool:
        """Every step passed."""
        return all(s.status == PASS for s in self.steps)

    def run(self, signer: CommandSigner) -> None:
        """All the steps, in order; stops at the first one the rest depend on."""
        prefix = f"{self.config.mqtt.topic_prefix}/{self.config.site.id}"
        observer = _Observer(prefix, self.lock.unit)
        started = time.monotonic()
        client = SiteClient(self.config.mqtt, self.account, client_name="stora-selftest",
                            subscriptions=observer.topics, on_message=observer.on_message,
                            certificate=self.certificate)
        try:
            client.start()
        except SiteLinkError as exc:
            if exc.status != 1:  # refused credentials or ACL: the caller's to fix (exit 2)
                raise
            self.add("broker", FAIL, started, str(exc))
            self.skip("agent", "command", "unlocked", "relocked", "timeline unlock",
                      "timeline relock")
            return
        try:
            self.add("broker", PASS, started, f"connected to {self.config.mqtt.where} "
                     f"{self.account.label}")
            self._after_broker(client, observer, prefix, signer)
        finally:
            client.close()

    def _after_broker(self, client: SiteClient, observer: _Observer, prefix: str,
                      signer: CommandSigner) -> None:
        started = time.monotonic()
        status = observer.wait(lambda: observer.status, STATUS_WAIT_S)
        if not status or not status.get("online"):
            why = ("it says offline (its last will): start it, or see its log" if status else
                   f"no retained status on {prefix}/status: is it running and connected to "
                   f"this broker, and may {self.account.username or 'an anonymous client'} "
                   "read it (the broker's ACL)?")
            self.add("agent", FAIL, started, f"the agent is not online: {why}")
            self.skip("command", "unlocked", "relocked", "timeline unlock", "timeline relock")
            return
        version = f", stora-gateway {cap_text(str(status['version']), 40)}" \
            if status.get("version") else ""
        self.add("agent", PASS, started, f"online{version}")
        tail, why_not = open_outbox(self.config)
        try:
            baseline = tail.newest_seq() if tail is not None else 0
            if not self._command(client, observer, prefix, signer):
                self.skip("unlocked", "relocked", "timeline unlock", "timeline relock")
                return
            self._states(observer)
            self._timeline(tail, why_not, baseline)
        finally:
            if tail is not None:
                tail.close()

    def _command(self, client: SiteClient, observer: _Observer, prefix: str,
                 signer: CommandSigner) -> bool:
        started = time.monotonic()
        ttl = min(COMMAND_TTL_S, self.config.commands.max_lifetime_s)
        actor = cap_text(f"site self-test by {getpass.getuser()}", 100)
        _, token = signer.command("unlock", self.lock.unit, jti=self.jti, ttl=ttl,
                                  dur=self.seconds, actor=actor)
        what = (f"signed unlock of {self.lock.reference} for {self.seconds} s (key "
                f"{signer.kid}, jti {self.jti})")
        with observer.cond:
            anonymous_before = len(observer.anonymous)
        try:
            client.publish(f"{prefix}/cmd", token)
        except SiteLinkError as exc:
            self.add("command", FAIL, started, f"{what}: {exc}")
            return False
        # The agent's answer, or a refusal without an id arriving meanwhile: on a site
        # being commissioned that is this command (a key the agent does not trust).
        observer.wait(lambda: self.jti in observer.results
                      or len(observer.anonymous) > anonymous_before, ttl)
        with observer.cond:
            result = observer.results.get(self.jti)
            if result is None and len(observer.anonymous) > anonymous_before:
                result = observer.anonymous[anonymous_before]
                what += " (answered without an id, as for any token whose signature the " \
                        "agent cannot check)"
        if not result:
            self.add("command", FAIL, started, f"{what}: no result within {ttl} s: the agent "
                     "did not receive it (is the account allowed to write the command "
                     "topic?) or could not answer")
            return False
        if result.get("status") != "done":
            self.add("command", FAIL, started, f"{what}: "
                     f"{liveview.describe_result(result, {self.lock.unit: self.lock.reference})}"
                     f"{_hint(result.get('reason'), signer.kid)}")
            return False
        self.add("command", PASS, started, f"{what}: done")
        return True

    def _states(self, observer: _Observer) -> None:
        started = time.monotonic()

        def unlocked() -> int | None:
            for i, state in enumerate(observer.states):
                if state.get("locked") is False:
                    return i
            return None

        index = observer.wait(unlocked, STATE_WAIT_S)
        if index is None:
            with observer.cond:
                last = observer.states[-1] if observer.states else None
            self.add("unlocked", FAIL, started, "the unit's published state never showed it "
                     f"unlocked (last: {liveview.describe_state(last) if last else 'none'})")
            self.skip("relocked")
            return
        self.add("unlocked", PASS, started, liveview.describe_state(observer.states[index]))
        started = time.monotonic()
        relocked = observer.wait(
            lambda: any(s.get("locked") is True for s in observer.states[index:]),
            self.seconds + RELOCK_MARGIN_S)
        with observer.cond:
            last = observer.states[-1] if observer.states else None
        if relocked:
            self.add("relocked", PASS, started, liveview.describe_state(last or {}))
        else:
            self.add("relocked", FAIL, started, f"not locked again within "
                     f"{self.seconds + RELOCK_MARGIN_S:.0f} s (now: "
                     f"{liveview.describe_state(last) if last else 'unknown'}): check the "
                     "lock at once")

    def _timeline(self, tail: Store | None, why_not: str | None, baseline: int) -> None:
        if tail is None:
            for name in ("timeline unlock", "timeline relock"):
                self.add(name, FAIL, None, f"cannot read the outbox: {why_not}")
            return
        started = time.monotonic()
        deadline = started + self.timeline_wait_s
        found: dict[str, EventRow] = {}
        while True:
            found = _events_of(tail, baseline, self.lock.unit)
            if all(k in found and found[k].state != "pending" for k in ("unlocked", "locked")):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(OUTBOX_POLL_S)
        for name, kind in (("timeline unlock", "unlocked"), ("timeline relock", "locked")):
            row = found.get(kind)
            if row is None:
                self.add(name, FAIL, started, "no Timeline Event was recorded for it")
            elif row.state == "delivered":
                self.add(name, PASS, started,
                         f"delivered to Stora: {cap_text(row.description, 160)}")
            elif row.state == "dead":
                self.add(name, FAIL, started, f"REFUSED by Stora (dead letter "
                         f"{row.seq}: {refusal_of(row)}); see `stora-gateway outbox --dead`")
            else:
                error = f"; last error: {cap_text(row.last_error, 160)}" if row.last_error \
                    else ""
                self.add(name, FAIL, started, f"queued, not delivered within "
                         f"{self.timeline_wait_s:.0f} s (event {row.seq}, "
                         f"{plural(row.attempts, 'attempt')}{error}); it stays queued: see "
                         "`stora-gateway outbox`")


def _events_of(tail: Store, baseline: int, unit: str) -> dict[str, EventRow]:
    """The first unlock event of ``unit`` after ``baseline`` and the first lock after it."""
    found: dict[str, EventRow] = {}
    seq = baseline
    while True:
        rows = tail.events_after(seq)
        if not rows:
            return found
        for row in rows:
            seq = row.seq
            if row.unit != unit:
                continue
            if row.kind == "unlocked" and "unlocked" not in found:
                found["unlocked"] = row
            elif row.kind == "locked" and "unlocked" in found and "locked" not in found:
                found["locked"] = row


#: What to do about a refusal, by contract §4 reason.
_HINTS: Final[Mapping[str, str]] = {
    "unknown_key": "the agent does not trust key {kid}: add it to [commands] trusted_keys "
                   "and restart the agent",
    "bad_signature": "the agent trusts another key under {kid}: compare trusted_keys with "
                     "the self-test key's public half",
    "clock_untrusted": "the agent's clock is not trusted yet: see `stora-gateway clock`",
    "expired": "the clocks of this machine and the gateway differ: set both by NTP",
    "not_yet_valid": "the clocks of this machine and the gateway differ: set both by NTP",
    "overlocked": "the unit is in lockout; the self-test never overrides one: pick "
                  "another unit",
    "unknown_unit": "the running agent's config lacks this unit: restart it after "
                    "editing the config",
    "wrong_site": "this config's site.id is not the agent's",
    "not_confirmed": "the lock did not confirm: check its wiring with `stora-gateway test`",
    "hardware_error": "the controller did not answer: see `stora-gateway status`",
}


def _hint(reason: object, kid: str) -> str:
    hint = _HINTS.get(str(reason))
    return f" ({hint.format(kid=kid)})" if hint else ""


# -- output -------------------------------------------------------------------------------------
#: Column widths of the table, printed a line at a time: the longest step name
#: ("timeline unlock"), "result", and a time such as "1234 ms".
_WIDTHS: Final = (15, 6, 7)


def _row(*cells: str) -> str:
    fixed = "  ".join(c.ljust(w) for c, w in zip(cells[:3], _WIDTHS, strict=True))
    return f"{fixed}  {cells[3]}\n"


def _step_line(step: Step) -> str:
    return _row(step.step, step.status,
                "-" if step.seconds is None else _duration(step.seconds), step.detail)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _reminder(kid: str, key_file: Path) -> str:
    return (f"The key {kid!r} opens every door while [commands] trusted_keys lists it: "
            f"remove it there, and delete {key_file}, once the site is commissioned.")


def run_selftest(config: Config, lock: LockConfig, account: BrokerAccount, key_file: Path,
                 out: TextIO, *, kid: str = SELFTEST_KID, seconds: int = 3,
                 timeline_wait_s: float = TIMELINE_WAIT_S, json_output: bool = False,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None) -> int:
    """Run the self-test of ``lock`` and print the report; 0 when every step passed.

    ``key_file`` is the signing key; ``tls_cert_file``/``tls_key_file`` the self-test's
    own TLS client certificate (default :data:`SELFTEST_CERT_ENV`/
    :data:`SELFTEST_TLS_KEY_ENV`; none: the CA alone), never the agent's.
    """
    signer = _signer(config, key_file, kid)
    certificate = client_certificate(config, tls_cert_file, tls_key_file,
                                     cert_env=SELFTEST_CERT_ENV, key_env=SELFTEST_TLS_KEY_ENV)
    test = SelfTest(config, lock, account, seconds, timeline_wait_s, certificate=certificate)
    if not json_output:
        def show(step: Step) -> None:
            out.write(_step_line(step))
            out.flush()

        test.on_step = show
        out.write(f"self-test of {lock.reference} ({lock.unit}) at site {config.site.id}: "
                  f"it unlocks for {seconds} s\n" + _row("step", "result", "time", "detail"))
        out.flush()
    test.run(signer)
    reminder = _reminder(kid, key_file)
    if json_output:
        out.write(json.dumps({"ok": test.ok, "site": config.site.id, "unit": lock.unit,
                              "reference": lock.reference, "jti": test.jti,
                              "steps": [s.as_dict() for s in test.steps],
                              "reminder": reminder}, indent=2) + "\n")
    else:
        verdict = ("OK: broker → agent → lock → Timeline works for " + lock.reference
                   if test.ok else "FAILED: " + ", ".join(s.step for s in test.steps
                                                          if s.status == FAIL))
        out.write(f"{verdict}\n{reminder}\n")
    return 0 if test.ok else 1
