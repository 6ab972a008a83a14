"""Secrets of the relay: encryption at rest, its own credentials, PKCE and OAuth state.

**Encryption at rest** (operators' Stora tokens, webhook secrets): AES-256-GCM under a
:class:`Keyring` read from ``secrets.data_key_file``.  That file holds one or more keys,
one per line, each 32 random bytes in base64 (standard or URL-safe alphabet, padding
optional); blank lines and ``#`` comments are ignored.  **The first key is current**: it
encrypts everything new.  The others only decrypt.  A key rotates like this:

1. put a new key (:func:`generate_key_text`) on the first line, keep the old one below it,
   and restart every replica;
2. re-encrypt what :meth:`Keyring.needs_rotation` reports (the relay does it when it next
   writes the value, or in one pass);
3. when nothing is left under the old key, delete its line.

A value is stored as the text ``v1.<kid>.<base64url(nonce ‖ ciphertext ‖ tag)>``: ``kid``
is the first 8 hex digits of SHA-256 of the key, so a reader finds the key without trying
each one, and a message can name it without revealing it.  The caller's ``aad`` (e.g. the
table, column and row id) is authenticated with it, so a value copied into another row or
column does not decrypt; so are the version and ``kid``.

**Credentials** (API keys, site credentials): ``<prefix>_<public id>.<secret>``.  The
public id finds the row; only SHA-256 of the whole text is stored.  The secret is 32 bytes
from :mod:`secrets`, so a guess succeeds with probability 2⁻²⁵⁶ whatever the hash speed: a
slow password hash (bcrypt, argon2) protects low-entropy passwords and would only cost CPU
on every API call here.  Digests are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.errors import ConfigError, DecryptError, SecretFileError, problem_line

__all__ = [
    "DATA_KEY_BYTES",
    "MAX_SECRET_BYTES",
    "Credential",
    "DecryptError",
    "Keyring",
    "digest_secret",
    "generate_key_text",
    "key_id",
    "new_credential",
    "new_state",
    "parse_credential",
    "pkce_challenge",
    "pkce_pair",
    "read_secret_file",
    "same_digest",
]

#: AES-256: the key length of a data key.
DATA_KEY_BYTES: Final = 32
#: A secret file is a key, a password or a token: a few hundred bytes.  Refusing anything
#: big keeps a wrong path (a log, /dev/zero) from being read into memory.
MAX_SECRET_BYTES: Final = 64 * 1024
#: NIST SP 800-38D §8.2.2: a random 96-bit nonce per message.
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_VERSION: Final = "v1"
_KID = re.compile(r"[0-9a-f]{8}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
#: Standard or URL-safe base64, padding optional (a key line after comments are cut).
_KEY_LINE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
#: Where the config names the key file; used in the ConfigError lines of the keyring.
_KEY_FILE_KEY: Final = "secrets.data_key_file"

# -- credentials: see the module docstring
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,15}")
_PUBLIC_ID_CHARS: Final = 12
_SECRET_BYTES: Final = 32
#: token_urlsafe(32) gives 43 characters: the shortest secret accepted.
_MIN_SECRET_CHARS: Final = 43
#: Prefix, id and a secret of up to ~128 characters: anything longer is junk.
_MAX_CREDENTIAL_CHARS: Final = 200
#: RFC 7636 §4.1: 32 random octets give a 43-character verifier.
_VERIFIER_BYTES: Final = 32
_STATE_BYTES: Final = 32


# --------------------------------------------------------------------------- secret files


def read_secret_file(path: Path, *, what: str = "secret file",
                     limit: int = MAX_SECRET_BYTES) -> str:
    """The text of a secret file, stripped of surrounding whitespace (contract §3).

    Raises :class:`SecretFileError` naming ``path`` unless the file exists, is a regular
    file that neither group nor others may read or write (``mode & 0o077 == 0``), holds
    UTF-8 text, is at most ``limit`` bytes and is not blank.  The checks are made on the
    opened file, so the file read is the one checked.
    """
    try:
        # O_NONBLOCK: a FIFO at that path must not hang the loader; fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise SecretFileError(f"cannot read {what} {path}: {_os_reason(exc)}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o077:
            raise SecretFileError(
                f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o} and is open to "
                f"group or others; run: chmod 600 {path}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise SecretFileError(f"cannot read {what} {path}: {_os_reason(exc)}") from exc
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:
        raise SecretFileError(f"{what} {path} is larger than {limit // 1024} KiB; "
                              f"is it the right file?")
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise SecretFileError(f"{what} {path} is not UTF-8 text (bad byte at offset "
                              f"{exc.start})") from exc
    if not text:
        raise SecretFileError(f"{what} {path} is empty")
    return text


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- the keyring


def key_id(key: bytes) -> str:
    """The ``kid`` of a data key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def generate_key_text() -> str:
    """A new data key as one line for ``data_key_file``: 32 random bytes, base64."""
    return base64.b64encode(secrets.token_bytes(DATA_KEY_BYTES)).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Strict base64url without padding; ``ValueError`` on anything else."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Canonical only: the unused low bits of the last character must be zero, so that
    # every edit of the text is an edit of the bytes (and fails authentication).
    if _b64url(data) != text:
        raise ValueError("not canonical base64url")
    return data


def _parse_key_lines(text: str, path: Path) -> list[bytes]:
    """The keys of a key file's text, in order; SecretFileError naming the line."""
    keys: list[bytes] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        where = f"data key file {path}, line {number}"
        key = _decode_key(body)
        if key is None:
            raise SecretFileError(f"{where}: not base64 (a key line is 32 random bytes in "
                                  f"base64, e.g. from `openssl rand -base64 32`)")
        if len(key) != DATA_KEY_BYTES:
            raise SecretFileError(f"{where}: the key is {len(key)} bytes, not "
                                  f"{DATA_KEY_BYTES} (AES-256)")
        kid = key_id(key)
        if kid in seen:
            raise SecretFileError(f"{where}: key {kid} is already on line {seen[kid]}")
        seen[kid] = number
        keys.append(key)
    if not keys:
        raise SecretFileError(f"data key file {path} holds no key (only blank lines and "
                              f"comments)")
    return keys


def _decode_key(body: str) -> bytes | None:
    if not _KEY_LINE.fullmatch(body):
        return None
    unpadded = body.rstrip("=").replace("-", "+").replace("_", "/")
    if len(unpadded) % 4 == 1:
        return None
    try:
        return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        return None


class Keyring:
    """The data keys, current first: encrypts with the current one, decrypts with any.

    Build it with :meth:`from_file` (``secrets.data_key_file``) or from raw keys.  Its
    repr shows key ids only.
    """

    __slots__ = ("_aead", "_current")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._aead: dict[str, AESGCM] = {}
        for key in keys:
            if len(key) != DATA_KEY_BYTES:
                raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes, not {len(key)}")
            self._aead.setdefault(key_id(key), AESGCM(key))
        self._current = key_id(keys[0])

    @classmethod
    def from_file(cls, path: Path, *, config_file: str | os.PathLike[str] | None = None
                  ) -> Keyring:
        """The keyring in the key file ``path`` (see the module docstring for its form).

        The file must pass the secret-file rules (:func:`read_secret_file`).  Any problem
        raises :class:`ConfigError` with one line: ``"<config_file>:
        secrets.data_key_file: <reason>"`` when the config file is given, else the
        reason alone (it names ``path``).
        """
        try:
            text = read_secret_file(path, what="data key file")
            return cls(_parse_key_lines(text, path))
        except SecretFileError as exc:
            if config_file is None:
                raise ConfigError(exc.reason) from exc
            raise ConfigError(problem_line(os.fspath(config_file), _KEY_FILE_KEY,
                                           exc.reason)) from exc

    @property
    def current_kid(self) -> str:
        """The id of the key that encrypts."""
        return self._current

    @property
    def kids(self) -> tuple[str, ...]:
        """Every key id, the current one first."""
        return tuple(self._aead)

    def __repr__(self) -> str:
        return f"Keyring(kids={list(self.kids)!r})"

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> str:
        """``plaintext`` encrypted under the current key, bound to ``aad``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead[self._current].encrypt(
            nonce, plaintext, _associated(self._current, aad))
        return f"{_VERSION}.{self._current}.{_b64url(nonce + sealed)}"

    def decrypt(self, token: str, *, aad: bytes) -> bytes:
        """The plaintext of ``token``; :class:`DecryptError` when it is malformed, under a
        key not in the ring, altered, or sealed with another ``aad``."""
        kid, blob = _split(token)
        aead = self._aead.get(kid)
        if aead is None:
            raise DecryptError(f"cannot decrypt: key {kid} is not in the data key file "
                               f"(a retired key removed too early, or another relay's data?)")
        try:
            return aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:],
                                _associated(kid, aad))
        except InvalidTag:
            raise DecryptError(f"cannot decrypt with key {kid}: the value was altered or "
                               f"belongs to another record") from None

    def needs_rotation(self, token: str) -> bool:
        """Whether ``token`` is sealed under a key other than the current one (to be
        re-encrypted); :class:`DecryptError` when it is not a token at all."""
        kid, _ = _split(token)
        return kid != self._current


def _associated(kid: str, aad: bytes) -> bytes:
    # The header is authenticated too: a token whose kid or version is edited fails.
    return f"{_VERSION}.{kid}.".encode("ascii") + aad


def _split(token: str) -> tuple[str, bytes]:
    """``(kid, nonce + ciphertext)`` of a token, or DecryptError."""
    if not isinstance(token, str):
        raise DecryptError(f"cannot decrypt: expected text, found {type(token).__name__}")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise DecryptError(f"cannot decrypt: not a {_VERSION}.<kid>.<data> value")
    kid, body = parts[1], parts[2]
    if not _KID.fullmatch(kid):
        raise DecryptError("cannot decrypt: the key id is not 8 hex digits")
    try:
        blob = _unb64url(body)
    except ValueError:
        raise DecryptError(f"cannot decrypt with key {kid}: the data is not base64url"
                           ) from None
    if len(blob) < _NONCE_BYTES + _TAG_BYTES:
        raise DecryptError(f"cannot decrypt with key {kid}: the data is truncated")
    return kid, blob


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credential:
    """A new credential: ``text`` is shown once and never stored; store ``public_id``
    (to find the row) and ``digest`` (:func:`digest_secret` of ``text``)."""

    text: str = field(repr=False)
    public_id: str
    digest: str = field(repr=False)


def new_credential(prefix: str) -> Credential:
    """A new credential ``"<prefix>_<public id>.<secret>"``.

    ``prefix`` (1–16 lowercase letters and digits, starting with a letter) says what
    the credential is for (``"rk"`` an API key, ``"rs"`` a site); the public id is 12
    base32 characters (60 bits, lowercase); the secret is 32 random bytes, URL-safe
    base64.
    """
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"a credential prefix is 1-16 lowercase letters and digits, "
                         f"found {prefix!r}")
    public_id = base64.b32encode(secrets.token_bytes(8)).decode("ascii")
    public_id = public_id[:_PUBLIC_ID_CHARS].lower()
    text = f"{prefix}_{public_id}.{secrets.token_urlsafe(_SECRET_BYTES)}"
    return Credential(text=text, public_id=public_id, digest=digest_secret(text))


def digest_secret(text: str) -> str:
    """SHA-256 (hex) of a whole credential text: what is stored and compared.

    A fast hash is enough because the secret is high-entropy (module docstring).
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_credential(text: object, prefix: str) -> tuple[str, str] | None:
    """``(public id, text)`` when ``text`` has exactly the form :func:`new_credential`
    makes with ``prefix``; ``None`` for anything else (wrong prefix, length, alphabet,
    not a string), never an exception.  Surrounding whitespace is not tolerated."""
    if not isinstance(text, str) or len(text) > _MAX_CREDENTIAL_CHARS:
        return None
    head, sep, secret = text.partition(".")
    if not sep or len(secret) < _MIN_SECRET_CHARS or not _B64URL.fullmatch(secret):
        return None
    expected, underscore, public_id = head.rpartition("_")
    if (not underscore or expected != prefix or len(public_id) != _PUBLIC_ID_CHARS
            or not all(ch in "abcdefghijklmnopqrstuvwxyz234567" for ch in public_id)):
        return None
    return public_id, text


def same_digest(a: str, b: str) -> bool:
    """Whether two digests are equal, in time independent of where they differ."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# --------------------------------------------------------------------------- OAuth


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2, S256: BASE64URL-no-padding(SHA256(ASCII(verifier)))."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def pkce_pair() -> tuple[str, str]:
    """A new ``(code_verifier, code_challenge)`` for one authorization (RFC 7636): the
    verifier is 43 characters of the unreserved set (32 random bytes)."""
    verifier = secrets.token_urlsafe(_VERIFIER_BYTES)
    return verifier, pkce_challenge(verifier)


def new_state() -> str:
    """A new OAuth ``state``: 256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(_STATE_BYTES)
