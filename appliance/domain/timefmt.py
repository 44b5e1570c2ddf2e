"""Durations and instants as people type them: `90s`, `30m`, `12h`, `30d`, `2w`, `2027-01-01`."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from appliance.errors import ApplianceError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def is_duration(text: str) -> bool:
    return bool(_DURATION.match(text))


def parse_duration(text: str | int | float, *, param: str) -> float:
    """Seconds from `30d`, `12h`, `90` (seconds) …; positive only."""
    if isinstance(text, bool):
        raise ApplianceError(f"{param}: a duration like 30d, 12h, 15m or seconds is required", status=422, code="invalid_duration", param=param)
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ApplianceError(
                f"{param}: {text!r} is not a duration (use e.g. 30d, 12h, 15m, 90s or a number of seconds)",
                status=422, code="invalid_duration", param=param,
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ApplianceError(f"{param}: a duration must be positive", status=422, code="invalid_duration", param=param)
    return seconds


def parse_instant(text: str, *, param: str) -> float:
    """Epoch seconds from an ISO 8601 date or date-time; a date means its midnight UTC, no zone means UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApplianceError(
            f"{param}: {text!r} is not an ISO 8601 date or time (e.g. 2027-01-01 or 2027-01-01T12:00:00Z)",
            status=422, code="invalid_time", param=param,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_deadline(text: str, now: float, *, param: str) -> float:
    """`30d` (from now) or an instant: what `--expires` and `since` accept."""
    if _DURATION.match(text):
        return now + parse_duration(text, param=param)
    return parse_instant(text, param=param)


def parse_since(text: str, now: float, *, param: str) -> float:
    """`24h` (that long ago) or an instant."""
    if _DURATION.match(text):
        return now - parse_duration(text, param=param)
    return parse_instant(text, param=param)
