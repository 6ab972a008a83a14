"""The MQTT topics of one site (contract §4): ``P/S/…``, ``P`` = ``mqtt.topic_prefix``,
``S`` = ``site.id``.

===============================  ====  ============  =================================
topic                            dir   QoS / retain  built by
===============================  ====  ============  =================================
``P/S/cmd``                      in    1 / never     :attr:`Topics.cmd`
``P/S/cmd/result``               out   1 / no        :attr:`Topics.cmd_result`
``P/S/status``                   out   1 / retained  :attr:`Topics.status`
``P/S/units/<unit>``             out   1 / retained  :meth:`Topics.unit`
``P/S/alarm``                    out   1 / no        :attr:`Topics.alarm`
``P/S/mgmt``                     in    1 / never     :attr:`Topics.mgmt`
``P/S/mgmt/result``              out   1 / no        :attr:`Topics.mgmt_result`
``P/S/status/liveness/<client>`` both  0 / no        :meth:`Topics.liveness`
``P/S/status/bridge``            out   the bridge's  :attr:`Topics.bridge`
===============================  ====  ============  =================================

``status/liveness/<client>`` is the agent's own echo through the broker (a wedged path
is noticed within a keepalive); ``status/bridge`` is the site broker's bridge
notification on the cloud broker (deploy/mosquitto/site-broker.conf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["Topics", "liveness_topic"]

# MQTT wildcards, the level separator and NUL: never inside one topic level.
_TOPIC_UNSAFE: Final = frozenset("+#/\0")


def liveness_topic(status_topic: str, client_id: str) -> str:
    """The topic a link echoes its liveness tokens on: ``<status>/liveness/<id>``.

    Wildcard characters and ``/`` in the client id are replaced by ``_`` so the topic
    stays one level and publishable.
    """
    safe = "".join("_" if ch in _TOPIC_UNSAFE else ch for ch in client_id) or "_"
    return f"{status_topic}/liveness/{safe}"


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of the site ``site_id`` under ``prefix`` (``mqtt.topic_prefix``)."""

    prefix: str
    site_id: str

    @property
    def base(self) -> str:
        """``P/S``: every topic of the site is below it."""
        return f"{self.prefix}/{self.site_id}"

    @property
    def cmd(self) -> str:
        """``P/S/cmd``: signed commands, in."""
        return f"{self.base}/cmd"

    @property
    def cmd_result(self) -> str:
        """``P/S/cmd/result``: the result of each command, out."""
        return f"{self.base}/cmd/result"

    @property
    def status(self) -> str:
        """``P/S/status``: the agent's retained status, its birth and last will."""
        return f"{self.base}/status"

    def unit(self, unit: str) -> str:
        """``P/S/units/<unit>``: one unit's retained state."""
        return f"{self.base}/units/{unit}"

    @property
    def units_filter(self) -> str:
        """``P/S/units/+``: the subscription filter for every unit's state."""
        return f"{self.base}/units/+"

    @property
    def alarm(self) -> str:
        """``P/S/alarm``: alarms, out."""
        return f"{self.base}/alarm"

    @property
    def mgmt(self) -> str:
        """``P/S/mgmt``: signed management requests, in."""
        return f"{self.base}/mgmt"

    @property
    def mgmt_result(self) -> str:
        """``P/S/mgmt/result``: the result of each management request, out."""
        return f"{self.base}/mgmt/result"

    def liveness(self, client_id: str) -> str:
        """``P/S/status/liveness/<client>`` (see :func:`liveness_topic`)."""
        return liveness_topic(self.status, client_id)

    @property
    def bridge(self) -> str:
        """``P/S/status/bridge``: the site broker's bridge state on the cloud broker."""
        return f"{self.base}/status/bridge"
