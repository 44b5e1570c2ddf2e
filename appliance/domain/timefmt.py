"""Durations and instants as people type them: `90s`, `30m`, `12h`, `30d`, `2w`, `2027-01-01`; and Backend.AI's
TimeDuration (`1.5h`, `2mo`, `1yr`) with its token-expiry rules, for endpoint tokens."""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass
from datetime import MAXYEAR, MINYEAR, UTC, datetime
from typing import Any

from appliance.errors import ApplianceError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def is_duration(text: str) -> bool:
    return bool(_DURATION.match(text))


def parse_duration(text: str | float, *, param: str) -> float:
    """Seconds from `30d`, `12h`, `90` (seconds) …; positive only."""
    if isinstance(text, bool):
        raise ApplianceError(f"{param}: a duration like 30d, 12h, 15m or seconds is required", status=422, code="invalid_duration", param=param)
    if isinstance(text, (int, float)):
        seconds = _to_float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ApplianceError(
                f"{param}: {text!r} is not a duration (use e.g. 30d, 12h, 15m, 90s or a number of seconds)",
                status=422, code="invalid_duration", param=param,
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if math.isnan(seconds):
        raise ApplianceError(f"{param}: {text!r} is not a duration", status=422, code="invalid_duration", param=param)
    if seconds <= 0:
        raise ApplianceError(f"{param}: a duration must be positive", status=422, code="invalid_duration", param=param)
    return seconds


KEEP_ALIVE_FORMS = "a duration such as 5m, 1h30m or 300 (seconds), 0 (unload once idle) or -1 (never unload for idleness)"


_GO_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|[smhdw]))+$")
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[smhdw])")


def parse_keep_alive(value: Any, *, param: str, status: int = 422) -> float | None:
    """Ollama's keep_alive: seconds a loaded model stays after its last request; None for a negative
    value (kept until evicted or unloaded); 0 unloads it as soon as it is idle. Numbers are seconds;
    strings are a number of seconds or a duration, Go's compound ones (`1h30m`, `500ms`) included."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-").strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", body):
            seconds = sign * float(body)
        elif _GO_DURATION.match(body):
            seconds = sign * sum(float(n) * (0.001 if unit == "ms" else _UNITS[unit]) for n, unit in _GO_PART.findall(body))
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        raise ApplianceError(f"{param}: {value!r} is not a keep_alive: use {KEEP_ALIVE_FORMS}", status=status, code="invalid_keep_alive", param=param)
    return None if seconds < 0 else seconds


def parse_instant(text: str, *, param: str) -> float:
    """Epoch seconds from an ISO 8601 date or date-time; a date means its midnight UTC, no zone means UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))  # noqa: FURB162 (a bare date: 2027-01-01Z)
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


# --- Backend.AI's TimeDuration and token expiry (endpoint tokens) -------------------------------------
# Backend.AI (common/typed_validators.py TimeDuration): a number or a numeric string is seconds; one-letter
# units w, d, h, m (MINUTES), s take fractions ("1.5h"); two-letter units yr and mo are calendar years and
# months and take whole numbers only. The shared parse_duration above stays as it is for keys and usage.

_BAI_SECONDS = {"w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_BAI_MONTHS = {"yr": 12, "mo": 1}
_BAI_DURATION = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)$")  # what float() reads
_WHOLE = re.compile(r"^[+-]?\d+$")
BAI_DURATION_HELP = "seconds, or a number with w, d, h, m (minutes) or s (fractions allowed: 1.5h), or whole mo (months) or yr (years)"
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class CalendarDuration:
    """A Backend.AI duration: whole calendar months (`mo`, `yr`) or seconds (every other unit)."""

    months: int = 0
    seconds: float = 0.0


def _to_float(value: float) -> float:
    """A number as float, a huge int as infinity (float() would raise)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _duration_error(param: str, why: str) -> ApplianceError:
    return ApplianceError(f"{param}: {why}", status=422, code="invalid_duration", param=param)


def parse_bai_duration(value: str | float, *, param: str) -> CalendarDuration:
    """Backend.AI's TimeDuration: `3600`, `"3600"`, `"90m"` (minutes), `"1.5h"`, `"2w"`, `"2mo"`, `"1yr"`; positive only."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _duration_error(param, f"a duration is a number of seconds or a string ({BAI_DURATION_HELP})")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise _duration_error(param, f"{value!r} is not a duration")
        result = CalendarDuration(seconds=_to_float(value))
    else:
        text = value.strip()
        match = _BAI_DURATION.match(text)
        if not match:
            raise _duration_error(param, f"{value!r} is not a duration ({BAI_DURATION_HELP}, e.g. 90m, 7d, 2mo, 1yr)")
        number, unit = match.groups()
        if unit in _BAI_MONTHS:
            if not _WHOLE.match(number):
                raise _duration_error(param, f"{value!r}: {unit} takes a whole number (e.g. 2{unit}); use d or h for fractions")
            if len(number) > 8:
                raise _duration_error(param, f"{value!r} is too long")
            result = CalendarDuration(months=int(number) * _BAI_MONTHS[unit])
        elif unit in _BAI_SECONDS or not unit:
            result = CalendarDuration(seconds=float(number) * _BAI_SECONDS.get(unit, 1.0))
        else:
            raise _duration_error(param, f"{value!r} has an unknown unit {unit!r}: use w, d, h, m (minutes), s, mo (months) or yr (years)")
    if result.months < 0 or result.seconds < 0 or (result.months == 0 and result.seconds == 0):
        raise _duration_error(param, f"{value!r}: a duration must be positive")
    return result


def add_months(moment: datetime, months: int) -> datetime:
    """`moment` that many calendar months later; the day is clamped to the month's last (Jan 31 + 1 = Feb 28 or 29)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    if not MINYEAR <= year <= MAXYEAR:
        raise OverflowError(f"year {year} is out of range")
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def add_duration(now: float, length: CalendarDuration) -> float:
    """Epoch seconds `length` after `now`: months the calendar way in UTC, seconds as they are."""
    if length.months:
        return add_months(datetime.fromtimestamp(now, UTC), length.months).timestamp() + length.seconds
    return now + length.seconds


def parse_epoch_or_instant(value: str | float, *, param: str) -> float:
    """Epoch seconds from Unix epoch seconds (`1767225600`, `"1767225600"`, Backend.AI's form) or an ISO 8601
    date or time (the appliance's addition; no zone means UTC). Fractional epoch seconds are refused, as in Backend.AI."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ApplianceError(f"{param}: Unix epoch seconds or an ISO 8601 time is required", status=422, code="invalid_time", param=param)
    if isinstance(value, int):
        return _to_float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ApplianceError(f"{param}: {value!r} is not a whole number of epoch seconds", status=422, code="invalid_time", param=param)
        return value
    if _WHOLE.match(value.strip()):
        return float(value.strip())  # exact for any epoch a datetime can hold; a huge one is caught as too far
    return parse_instant(value, param=param)


def token_expiry(valid_until: str | float | None, duration: str | float | None, now: float) -> float:
    """When an endpoint token ends, as Backend.AI decides it: `valid_until` wins over `duration` (both are
    validated), one of them is required, and the result may not be in the past."""
    if valid_until is None and duration is None:
        raise ApplianceError(
            "a token needs valid_until (epoch seconds or ISO 8601) or duration (e.g. 7d)", status=422, code="invalid_expiry", param="valid_until",
        )
    length = None if duration is None else parse_bai_duration(duration, param="duration")  # checked even when valid_until wins
    if valid_until is not None:
        param, expires = "valid_until", parse_epoch_or_instant(valid_until, param="valid_until")
        if expires <= now:
            raise ApplianceError(f"valid_until: {valid_until!r}: the expiration time cannot be in the past", status=422,
                                 code="invalid_expiry", param=param)
    else:
        param = "duration"
        try:
            expires = add_duration(now, length or CalendarDuration())
        except OverflowError:
            expires = math.inf
    if expires > LATEST:
        raise ApplianceError(f"{param}: the expiration time is too far in the future (after 9999-12-31)", status=422,
                             code="invalid_expiry", param=param)
    return expires
