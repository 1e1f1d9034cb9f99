"""API keys for the gateway: OpenAI-style `Authorization: Bearer <key>`, accepted keys kept in a file.

One key per line, so that during a rotation the old and the new key are both live; blank lines and
`#` comments are ignored. The file is re-read when its modification time changes, so a rotation needs
no restart. A Kubernetes secret mounted as a file works unchanged.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from rag.config import ConfigError

logger = logging.getLogger("rag.auth")
# secrets.token_urlsafe(32) gives 43 characters; anything much shorter is a password, not a key.
MIN_KEY_CHARS = 16
BEARER = "bearer "


def parse_keys(text: str, source: Path) -> tuple[str, ...]:
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError(f"API key file {source} holds no key (one key per line)")
    short = [i for i, key in enumerate(keys, 1) if len(key) < MIN_KEY_CHARS]
    if short:
        raise ConfigError(f"API key file {source}: key {short[0]} is shorter than {MIN_KEY_CHARS} characters")
    return keys


class ApiKeys:
    """The keys the gateway accepts, re-read from `path` whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: tuple[bytes, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._load()

    def _load(self) -> None:
        """Read the file; a gateway that cannot must not start, so every failure here is a ConfigError."""
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"API key file {self.path} cannot be read ({exc.strerror}); create it (make demo "
                              "does) or point the gateway's api_key_file at it") from None
        self._keys = tuple(key.encode() for key in parse_keys(text, self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)

    def refresh(self) -> None:
        """Re-read the file if it changed. Emptying or deleting it revokes every key (fail closed): an
        operator who removes the file to lock clients out must not find the old keys still working.
        Rotate by writing a new file and renaming it over the old one, so no reader sees it half-written."""
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) == self._stamp:
                return
            self._load()
            logger.info("event=API_KEYS_RELOADED keys=%d", len(self._keys))
        except (OSError, ConfigError) as exc:
            if self._keys:  # once per change of state, not once per request
                logger.warning("event=API_KEYS_REVOKED reason=%s", exc)
            self._keys, self._stamp = (), None

    def accepts(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys; constant time per key, and
        every key is compared, so timing does not tell which one came close."""
        self.refresh()
        if not authorization or authorization[:len(BEARER)].lower() != BEARER:
            return False
        given = authorization[len(BEARER):].strip().encode(errors="replace")
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        return any(matches)


def create_key_file(path: Path) -> bool:
    """Write a new random key to `path` (mode 0600) unless the file exists; True if it was created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return True


def read_client_key(path: Path) -> str:
    """The key a client sends: the first one in the file (during a rotation, put the new key first)."""
    return parse_keys(path.read_text(encoding="utf-8"), path)[0]


def bearer(key: str | None) -> dict[str, str]:
    """The header that carries `key`; none when no key is given (an unauthenticated local gateway)."""
    return {"authorization": f"Bearer {key}"} if key else {}
