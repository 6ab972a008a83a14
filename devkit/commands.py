"""The dev kit's commands of ``stora-gateway``: ``demo``, ``sandbox``, ``simulate``,
``selftest``.

The product never imports the dev kit: this module is a CLI plugin
(``gateway/cli/plugins.py``), named in ``pyproject.toml``::

    [project.entry-points."stora_gateway.commands"]
    devkit = "devkit.commands:COMMANDS"

``stora-gateway --help`` loads it, so it holds only the parsers and thin handlers; the
demo, the sandbox, the simulators and the self-test load when their command runs.
"""

from __future__ import annotations

import argparse
import os

from devkit.simulate_options import add_driver_parsers
from gateway.cli.main import EXIT_FAILED, EXIT_OK, PROG, CliError, Context
from gateway.cli.plugins import PluginCommand

__all__ = ["COMMANDS"]


# -- demo ---------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    del common
    p.add_argument("--pace", type=float, default=1.5, metavar="S",
                   help="pause before each demo step, in seconds (default 1.5; 0 runs "
                   "as fast as the simulated hardware allows)")
    p.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                   help="MQTT broker: Mosquitto if installed, else the embedded pure-Python "
                   "one (auto, the default), or either of them")


def cmd_demo(ctx: Context) -> int:
    """``demo``: the whole loop on simulated hardware, checking itself as it goes."""
    if not 0 <= ctx.args.pace <= 60:
        raise CliError("--pace must be from 0 to 60 seconds")
    from devkit.demo import run_demo

    try:
        return run_demo(ctx.out, pace=ctx.args.pace, broker=ctx.args.broker)
    except OSError as exc:  # no mosquitto with --broker mosquitto, no free port, no pty
        raise CliError(f"the demo cannot start: {exc}", EXIT_FAILED) from exc


# -- sandbox ------------------------------------------------------------------------------
def _sandbox_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    del common
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8089, help="TCP port; 0 picks a free one "
                   "(default 8089)")
    p.add_argument("--client-id", default=None, metavar="ID",
                   help="OAuth client id that /oauth2/token accepts")
    p.add_argument("--client-secret-file", default=None, metavar="FILE",
                   help="file holding that client's secret")
    p.add_argument("--static-token-file", default=None, metavar="FILE",
                   help="file of long-lived Bearer tokens to accept, one per line")
    p.add_argument("--max-per-second", type=int, default=10, metavar="N",
                   help="requests allowed in any 1-second window (default 10)")
    p.add_argument("--max-per-minute", type=int, default=60, metavar="N",
                   help="requests allowed in any 60-second window (default 60)")
    p.add_argument("--token-ttl", type=int, default=7200, metavar="S",
                   help="lifetime of issued access tokens in seconds (default 7200)")
    p.add_argument("--partner-client-id", default=None, metavar="ID",
                   help="client id of a partner app that may run the Authorization Code flow "
                   "(/oauth2/authorize)")
    p.add_argument("--partner-client-secret-file", default=None, metavar="FILE",
                   help="file holding that partner app's client secret")
    p.add_argument("--redirect-uri", action="append", default=[], metavar="URL",
                   help="a redirect URI the partner app registered (repeatable)")
    p.add_argument("--partner-token-ttl", type=int, default=7200, metavar="S",
                   help="lifetime of the partner app's access tokens in seconds (default 7200)")
    p.add_argument("--demo-operator", action="store_true",
                   help="add an operator 'demo' with one site, a gate and three units")


def cmd_sandbox(ctx: Context) -> int:
    """``sandbox``: a local Stora API in the foreground until SIGTERM or Ctrl-C.

    Secrets come from files only, so they stay out of ``ps`` and shell history.
    """
    from devkit.sandbox import (
        PartnerApp,
        Sandbox,
        add_demo_operator,
        read_secret_file,
        read_token_file,
        serve,
    )

    a = ctx.args
    if (a.client_id is None) != (a.client_secret_file is None):
        raise CliError("--client-id and --client-secret-file go together")
    partner = a.partner_client_id, a.partner_client_secret_file, a.redirect_uri
    if any(partner) and not all(partner):
        raise CliError("--partner-client-id, --partner-client-secret-file and --redirect-uri "
                       "go together")
    try:
        clients = {a.client_id: read_secret_file(a.client_secret_file)} if a.client_id else {}
        tokens = read_token_file(a.static_token_file) if a.static_token_file else []
        app = PartnerApp(a.partner_client_id, read_secret_file(a.partner_client_secret_file),
                         tuple(a.redirect_uri)) if a.partner_client_id else None
        sandbox = Sandbox(host=a.host, port=a.port, clients=clients, static_tokens=tokens,
                          max_per_second=a.max_per_second, max_per_minute=a.max_per_minute,
                          token_ttl_s=a.token_ttl, partner_app=app,
                          access_token_ttl_s=a.partner_token_ttl)
        if a.demo_operator:
            add_demo_operator(sandbox)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if not clients and not tokens and app is None:
        ctx.err.write(f"{PROG}: no --client-id or --static-token-file: every API call will "
                      "be answered 401\n")
    try:
        return serve(sandbox, ctx.out)
    except OSError as exc:
        raise CliError(f"cannot listen on {a.host}:{a.port}: {exc.strerror or exc}",
                       EXIT_FAILED) from exc


# -- simulate -----------------------------------------------------------------------------
def _simulate_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    # A sub-command per driver; the options module imports no simulator.
    add_driver_parsers(p, [common])


def cmd_simulate(ctx: Context) -> int:
    """``simulate DRIVER``: one simulator standalone until Ctrl-C (devkit/simulate.py)."""
    from devkit.simulate import SimulateError, run_simulate

    try:
        return run_simulate(ctx.args, ctx.out, json_lines=ctx.json)
    except SimulateError as exc:
        raise CliError(str(exc), exc.status) from exc


# -- selftest -----------------------------------------------------------------------------
def _selftest_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    del common
    p.add_argument("unit", nargs="?", help="Stora unit id (unit_…) or the lock's reference "
                   "label; the door really opens")
    p.add_argument("--seconds", type=int, default=3, help="unlock duration, 1-60 (default 3)")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="the self-test's Ed25519 key (PEM, mode 600; default "
                   "$STORA_GATEWAY_SELFTEST_KEY)")
    p.add_argument("--kid", default="selftest",
                   help="its key id in [commands] trusted_keys (default selftest)")
    p.add_argument("--new-key", default=None, metavar="FILE",
                   help="write a new key to FILE and print the trusted_keys line for it")
    p.add_argument("--username", default=None,
                   help="broker account of its own, never the agent's (default "
                   "$STORA_GATEWAY_SELFTEST_USERNAME, else gw-selftest on a broker with "
                   "accounts)")
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="file holding that account's password, not readable by others "
                   "(default $STORA_GATEWAY_SELFTEST_PASSWORD_FILE)")
    p.add_argument("--tls-cert-file", default=None, metavar="FILE",
                   help="selftest's own TLS client certificate, never the agent's (default "
                   "$STORA_GATEWAY_SELFTEST_TLS_CERT_FILE; none: the CA of [mqtt] only)")
    p.add_argument("--tls-key-file", default=None, metavar="FILE",
                   help="its key, mode 600 (default $STORA_GATEWAY_SELFTEST_TLS_KEY_FILE)")
    p.add_argument("--timeline-wait", type=float, default=15.0, metavar="S",
                   help="how long to wait for both Timeline Events to reach Stora "
                   "(default 15)")


def cmd_selftest(ctx: Context) -> int:
    """``selftest UNIT``: a signed unlock through broker, agent, lock and Timeline
    (devkit/selftest.py); ``selftest --new-key FILE`` makes its key."""
    from pathlib import Path

    from devkit.selftest import (
        SELFTEST_ACCOUNT,
        SELFTEST_KEY_ENV,
        SELFTEST_PASSWORD_ENV,
        SELFTEST_USER_ENV,
        new_key,
        run_selftest,
    )
    from gateway.link.site_client import SiteLinkError, resolve_account

    a = ctx.args
    try:
        if a.new_key is not None:
            if a.unit is not None:
                raise CliError("--new-key makes a key and tests nothing: give it without UNIT")
            line = new_key(Path(a.new_key), a.kid)
            ctx.out.write(f"wrote {a.new_key} (keep it 600, off the gateway if you can); add "
                          f"this to [commands] trusted_keys, restart the agent, and remove "
                          f"it once the site is commissioned:\n{line}\n")
            return EXIT_OK
        if a.unit is None:
            raise CliError("give the UNIT to test (a unit id or reference), or --new-key FILE")
        if not 1 <= a.seconds <= 60:
            raise CliError("--seconds must be from 1 to 60")
        if not 0 <= a.timeline_wait <= 600:
            raise CliError("--timeline-wait must be from 0 to 600 seconds")
        key_file = a.key_file or os.environ.get(SELFTEST_KEY_ENV)
        if not key_file:
            raise CliError(f"give --key-file (or ${SELFTEST_KEY_ENV}); make a key with "
                           "`stora-gateway selftest --new-key FILE`")
        lock = ctx.find_lock(a.unit)
        account = resolve_account(ctx.config(), a.username, a.password_file,
                                  default_user=SELFTEST_ACCOUNT, user_env=SELFTEST_USER_ENV,
                                  password_env=SELFTEST_PASSWORD_ENV)
        return run_selftest(ctx.config(), lock, account, Path(key_file), ctx.out, kid=a.kid,
                            seconds=a.seconds, timeline_wait_s=a.timeline_wait,
                            json_output=ctx.json, tls_cert_file=a.tls_cert_file,
                            tls_key_file=a.tls_key_file)
    except SiteLinkError as exc:
        raise CliError(str(exc), exc.status) from exc


#: The commands, in the order ``--help`` lists them; ``before`` keeps each where it was
#: when the dev kit lived inside the product.
COMMANDS: tuple[PluginCommand, ...] = (
    PluginCommand("demo", "run the whole loop on this machine with simulated lock controllers",
                  cmd_demo, _demo_arguments, before="watch"),
    PluginCommand("sandbox", "run a local stand-in for the Stora API, for tests and "
                  "benchmarks", cmd_sandbox, _sandbox_arguments, before="watch"),
    PluginCommand("simulate", "run one lock controller's simulator (a pty or an MQTT "
                  "device) with its faults, to rehearse without hardware", cmd_simulate,
                  _simulate_arguments, prints_json=True, before="watch"),
    PluginCommand("selftest", "send a signed unlock through the broker and check agent, "
                  "lock, relock and Timeline Events", cmd_selftest, _selftest_arguments,
                  reads_config=True, prints_json=True, before="completion"),
)
