"""TLS for an MQTT connection: a client context that checks the chain and the hostname,
and closes the socket of a failed handshake.

paho 2.2 does not close the TLS socket when the handshake fails (a wrong CA, a hostname
mismatch): without :class:`TlsContext`, every failed attempt would leak a descriptor
until the garbage collector found it.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

__all__ = ["TlsContext", "client_tls_context"]


class TlsContext(ssl.SSLContext):
    """An SSLContext that remembers the socket it wrapped last."""

    last_wrapped: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """Wrap as usual and keep a reference for :meth:`close_failed`."""
        sock = super().wrap_socket(*args, **kwargs)
        self.last_wrapped = sock
        return sock

    def close_failed(self, current: object) -> None:
        """Close the last wrapped socket unless it is ``current`` (the one in use)."""
        sock, self.last_wrapped = self.last_wrapped, None
        if sock is not None and sock is not current:
            sock.close()


def client_tls_context(ca_file: Path) -> TlsContext:
    """A client TLS context trusting ``ca_file``: TLS ≥ 1.2, chain and hostname checked.

    A client certificate is the caller's to add (``load_cert_chain``).  Raises OSError
    (``ssl.SSLError`` included) or ValueError when the CA cannot be loaded.
    """
    # PROTOCOL_TLS_CLIENT verifies the chain and the hostname by default; both are set
    # again below so a later edit cannot quietly weaken them.
    context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
