"""Epoch seconds as ISO-8601 text, for the JSON a human reads.

Every epoch-seconds field ``X`` that ``events``, ``dlq list`` / ``show`` / ``export``
and ``status --json`` print has a twin ``X_iso`` right after it: the same instant in
local time with its UTC offset and milliseconds, ``2026-12-02T16:21:52.123+00:00``
(the epoch stays: scripts compare numbers). Records batched by the supervisor share a
timestamp, so the last conversion is remembered.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["iso", "with_iso"]

_last: tuple[float | None, str | None] = (None, None)


def iso(t: float | None) -> str | None:
    """``t`` (epoch seconds) as ISO-8601 local time with offset; None stays None."""
    global _last
    if t is None:
        return None
    if _last[0] == t:
        return _last[1]
    text = datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
    _last = (t, text)
    return text


def with_iso(record: dict[str, Any], *fields: str) -> dict[str, Any]:
    """A copy of ``record`` with ``F_iso`` right after each of ``fields`` it has."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        out[key] = value
        if key in fields and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{key}_iso"] = iso(value)
    return out
