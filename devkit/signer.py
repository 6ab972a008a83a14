"""Mint signed commands (contract §5) for the tests, the demo and, later, the relay.

The signer is the protocol's (:mod:`sitelink.sign`, :mod:`sitelink.jws`); this module
keeps the names the dev kit and the tests import, and adds :func:`load_private_key`,
which reads a key file under the gateway's secret-file rules and reports problems as a
:class:`~gateway.errors.ConfigError`.

The public key goes into ``[commands] trusted_keys`` as base64url of its raw 32 bytes
(:func:`public_key_text`), or as PEM.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway.errors import ConfigError
from sitelink.jws import generate_keypair, private_key_from_pem, public_key_text
from sitelink.sign import CommandSigner

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "CommandSigner",
    "generate_keypair",
    "load_private_key",
    "public_key_text",
]

_MAX_KEY_FILE_BYTES: Final = 64 * 1024  # a PEM key is a few hundred bytes


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the unencrypted PEM (PKCS#8) file at ``path``.

    Like every secret file of the gateway (contract §3) the file must be a regular file
    that group and others cannot access.  Raises :class:`~gateway.errors.ConfigError`
    naming the file for every problem: a person has to fix the file.
    """
    file = str(path)
    try:
        st = Path(path).stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(file, "", "the private key is not a regular file")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise ConfigError(file, "", f"private key file has mode {mode:04o} and is open to "
                                        f"group or others; run: chmod 600 {file}")
        with open(path, "rb") as fp:
            data = fp.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "private key file does not exist") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(file, "", f"cannot read the private key file: {exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(file, "", "file is too large to be a PEM private key")
    try:
        return private_key_from_pem(data)
    except ValueError as exc:
        raise ConfigError(file, "", str(exc)) from exc
