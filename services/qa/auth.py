"""API-key authentication, the same rule for HTTP and gRPC.

A client presents the key as ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (HTTP
headers, or gRPC metadata under the same lower-case names). Keys are compared in constant
time. With no key configured (``serve.api_key`` unset, which settings allow only while nothing
listens beyond loopback) every request passes.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

UNAUTHENTICATED = ("missing or wrong API key: send it as `Authorization: Bearer <key>` or "
                   "`x-api-key: <key>`")
_BEARER = "bearer "


def presented_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key in ``(name, value)`` pairs (names compared case-insensitively), if any."""
    for name, value in headers:
        name = name.lower()
        if name == "x-api-key":
            return value
        if name == "authorization" and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER):].strip()
    return None


def authorized(expected: str | None, headers: Iterable[tuple[str, str]]) -> bool:
    """True when no key is configured or ``headers`` present the configured one."""
    if expected is None:
        return True
    given = presented_key(headers)
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
