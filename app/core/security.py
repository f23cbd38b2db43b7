"""API keys: generated once, shown once, stored as a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "msk_"


def generate_key() -> str:
    """A new random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str, pepper: str) -> str:
    """HMAC-SHA256 of a key under the server's pepper (keys are random: no slow hash needed)."""
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters of a key, safe to show and log."""
    return key[: len(KEY_PREFIX) + 6]
