"""The relay's Prometheus metrics, served at ``GET /metrics`` (contract §7.2).

Each replica counts what it did itself; Prometheus adds the replicas up
(``sum without (instance)``).  The metrics live on a registry of this module's own
(:data:`REGISTRY`), with the process's CPU, memory and file descriptors, and are
incremented by the code that does the work:

==============================================  ==============================================
``stora_relay_webhooks_total{outcome}``         deliveries by outcome: ``command``,
                                                ``duplicate`` (deduped), ``older``, ``no_change``,
                                                ``ignored``, ``unregistered_site``, … and the
                                                refusals ``bad_signature``, ``stale_timestamp``,
                                                ``unknown_endpoint``, ``not_json``,
                                                ``no_event_id``, ``too_large``, ``conflict``
``stora_relay_commands_created_total{cmd,origin}``  commands recorded (``webhook``, ``api``,
                                                ``reconcile``, ``resend``)
``stora_relay_command_results_total{cmd,status,reason}``  results from gateways, and
                                                ``timeout`` (none by ``exp``)
``stora_relay_unlock_seconds{status}``          an unlock or lock call, request to answer
                                                (histogram; ``pending``: answered 202)
``stora_relay_stora_requests_total{kind,status}``  calls to Stora (``token``, ``api``,
                                                ``timeline``) by HTTP status, ``unreachable``
``stora_relay_rate_limit_waits_total{purpose}`` and ``…_wait_seconds_total``: background
                                                calls that waited for the operator's budget
``stora_relay_rate_limit_refusals_total``       429s the broker answered itself (a 429 from
                                                Stora avoided)
``stora_relay_token_refreshes_total{outcome}``  ``ok``, ``failed``, ``invalid_grant``
==============================================  ==============================================

Label values come from closed sets (codes of the contract) or are folded to ``other``,
so that nothing a gateway or Stora sends can grow the number of series.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sitelink.codes import Cmd, Reason, Status

__all__ = [
    "COMMANDS_CREATED",
    "COMMAND_RESULTS",
    "CONTENT_TYPE",
    "RATE_LIMIT_REFUSALS",
    "RATE_LIMIT_WAITS",
    "RATE_LIMIT_WAIT_SECONDS",
    "REFRESHES",
    "REGISTRY",
    "STORA_REQUESTS",
    "UNLOCK_SECONDS",
    "WEBHOOKS",
    "bounded",
    "command_result",
    "render",
]

REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

WEBHOOKS: Final = Counter("stora_relay_webhooks", "Webhook deliveries by outcome",
                          ["outcome"], registry=REGISTRY)
COMMANDS_CREATED: Final = Counter("stora_relay_commands_created", "Commands recorded",
                                  ["cmd", "origin"], registry=REGISTRY)
COMMAND_RESULTS: Final = Counter("stora_relay_command_results",
                                 "Command results from gateways, and timeouts",
                                 ["cmd", "status", "reason"], registry=REGISTRY)
UNLOCK_SECONDS: Final = Histogram(
    "stora_relay_unlock_seconds", "Unlock and lock calls, from request to answer",
    ["status"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0))
STORA_REQUESTS: Final = Counter("stora_relay_stora_requests", "Requests to Stora",
                                ["kind", "status"], registry=REGISTRY)
RATE_LIMIT_WAITS: Final = Counter("stora_relay_rate_limit_waits",
                                  "Calls that waited for the operator's rate budget",
                                  ["purpose"], registry=REGISTRY)
RATE_LIMIT_WAIT_SECONDS: Final = Counter("stora_relay_rate_limit_wait_seconds",
                                         "Seconds spent waiting for the rate budget",
                                         registry=REGISTRY)
RATE_LIMIT_REFUSALS: Final = Counter("stora_relay_rate_limit_refusals",
                                     "Requests answered 429 by the relay itself",
                                     registry=REGISTRY)
REFRESHES: Final = Counter("stora_relay_token_refreshes", "Access token refreshes",
                           ["outcome"], registry=REGISTRY)

_CMDS: Final = frozenset(c.value for c in Cmd)
_STATUSES: Final = frozenset({*(s.value for s in Status), "timeout"})
_REASONS: Final = frozenset({*(r.value for r in Reason), "timeout", "gateway_offline", ""})


def bounded(value: object, allowed: Collection[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``other`` (a label never grows)."""
    return value if isinstance(value, str) and value in allowed else "other"


def command_result(cmd: object, status: object, reason: object) -> None:
    """Count one result (or timeout) of a command."""
    COMMAND_RESULTS.labels(bounded(cmd, _CMDS), bounded(status, _STATUSES),
                           bounded(reason or "", _REASONS)).inc()


def render() -> bytes:
    """The exposition text of every metric."""
    return generate_latest(REGISTRY)
