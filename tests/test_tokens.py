"""Endpoint tokens' expiry as Backend.AI takes it: `valid_until` in epoch seconds (or ISO 8601, the appliance's
addition) and `duration` in Backend.AI's TimeDuration units, `yr` and `mo` the calendar way. The parser is
tested on its own, then through the real app with an injected clock."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for
from test_access import Clock, bearer, chat
from test_gateway import healthy
from test_supervisor import WORKERS, create, fake_folder

from appliance.api.app import make_app
from appliance.config import Config
from appliance.domain.timefmt import CalendarDuration, add_duration, add_months, parse_bai_duration, parse_duration, parse_epoch_or_instant, token_expiry
from appliance.errors import ApplianceError

NEW_YEAR_2026 = 1767225600.0  # 2026-01-01T00:00:00Z, the example in Backend.AI's TokenRequestModel


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# --- the parser, pure -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    (3600, 3600.0), (1.5, 1.5), ("3600", 3600.0), ("1.5", 1.5), (" 90 ", 90.0), ("1e3", 1000.0),
    ("2w", 14 * 86400.0), ("3d", 3 * 86400.0), ("12h", 12 * 3600.0), ("90m", 5400.0), ("45s", 45.0),
    ("1.5h", 5400.0), ("0.5d", 43200.0), (".5h", 1800.0), ("7 d", 7 * 86400.0), ("1.25w", 1.25 * 7 * 86400),
])
def test_bai_duration_second_units(text: str | float, seconds: float) -> None:
    assert parse_bai_duration(text, param="duration") == CalendarDuration(seconds=seconds)


@pytest.mark.parametrize(("text", "months"), [("1mo", 1), ("2mo", 2), ("18mo", 18), ("1yr", 12), ("3yr", 36), ("2 yr", 24)])
def test_bai_duration_calendar_units(text: str, months: int) -> None:
    assert parse_bai_duration(text, param="duration") == CalendarDuration(months=months)


def test_m_means_minutes_for_tokens_and_for_the_shared_parser() -> None:
    """Backend.AI's `m` is minutes, and so is the appliance's everywhere; months are `mo`."""
    assert parse_bai_duration("90m", param="duration").seconds == 90 * 60 == parse_duration("90m", param="x")


@pytest.mark.parametrize(("bad", "says"), [
    ("", "is not a duration"), ("   ", "is not a duration"), ("soon", "is not a duration"), ("d", "is not a duration"),
    ("1h30m", "is not a duration"), ("10ms", "unknown unit"), ("3M", "unknown unit"), ("2H", "unknown unit"), ("1y", "unknown unit"),
    ("5min", "unknown unit"), ("1e", "unknown unit"),
    ("-3d", "must be positive"), ("-1", "must be positive"), (-5, "must be positive"), ("0", "must be positive"),
    (0, "must be positive"), ("0s", "must be positive"), ("0mo", "must be positive"), ("-1yr", "must be positive"),
    ("1.5mo", "whole number"), ("2.5yr", "whole number"), ("2e1yr", "whole number"), ("123456789yr", "too long"),
    (math.nan, "is not a duration"), (math.inf, "is not a duration"), (True, "number of seconds or a string"),
    (None, "number of seconds or a string"), ([1], "number of seconds or a string"),
])
def test_bai_duration_refuses_bad_input_naming_the_field(bad: Any, says: str) -> None:
    with pytest.raises(ApplianceError) as info:
        parse_bai_duration(bad, param="duration")
    err = info.value
    assert err.status == 422 and err.code == "invalid_duration" and err.param == "duration"
    assert err.message.startswith("duration: ") and says in err.message, err.message


@pytest.mark.parametrize(("start", "months", "end"), [
    ((2027, 1, 31), 1, (2027, 2, 28)),  # clamped to the month's last day
    ((2028, 1, 31), 1, (2028, 2, 29)),  # a leap year
    ((2027, 3, 31), 1, (2027, 4, 30)),
    ((2027, 1, 30), 2, (2027, 3, 30)),
    ((2027, 12, 15), 1, (2028, 1, 15)),  # over the year's end
    ((2027, 11, 30), 3, (2028, 2, 29)),
    ((2027, 1, 31), 13, (2028, 2, 29)),
    ((2028, 2, 29), 12, (2029, 2, 28)),  # 1yr from a leap day
    ((2028, 2, 29), 48, (2032, 2, 29)),
    ((2027, 5, 31), 120, (2037, 5, 31)),
])
def test_add_months_the_calendar_way(start: tuple[int, int, int], months: int, end: tuple[int, int, int]) -> None:
    moment = datetime(*start, 13, 45, 7, 250000, tzinfo=UTC)
    assert add_months(moment, months) == datetime(*end, 13, 45, 7, 250000, tzinfo=UTC)  # the time of day is kept


def test_add_months_past_year_9999_overflows() -> None:
    with pytest.raises(OverflowError):
        add_months(datetime(9999, 12, 1, tzinfo=UTC), 1)


def test_add_duration_in_utc() -> None:
    now = at(2027, 1, 31, 12)
    assert utc(add_duration(now, parse_bai_duration("1mo", param="d"))) == datetime(2027, 2, 28, 12, tzinfo=UTC)
    assert utc(add_duration(now, parse_bai_duration("2mo", param="d"))) == datetime(2027, 3, 31, 12, tzinfo=UTC)
    assert utc(add_duration(now, parse_bai_duration("1yr", param="d"))) == datetime(2028, 1, 31, 12, tzinfo=UTC)
    assert add_duration(now, parse_bai_duration("1.5h", param="d")) == now + 5400


@pytest.mark.parametrize("value", [
    1767225600, 1767225600.0, "1767225600", " 1767225600 ", "2026-01-01", "2026-01-01T00:00:00Z",
    "2026-01-01T09:00:00+09:00", "2025-12-31T19:00:00-05:00", "2026-01-01T00:00:00",
])
def test_valid_until_epoch_or_iso_8601(value: str | float) -> None:
    assert parse_epoch_or_instant(value, param="valid_until") == NEW_YEAR_2026


@pytest.mark.parametrize("bad", [1767225600.5, "1767225600.5", "next tuesday", "", True, None])
def test_valid_until_refuses_fractions_and_non_times(bad: Any) -> None:
    with pytest.raises(ApplianceError) as info:
        parse_epoch_or_instant(bad, param="valid_until")
    assert info.value.status == 422 and info.value.code == "invalid_time" and info.value.param == "valid_until"


def test_token_expiry_follows_backend_ai_precedence() -> None:
    now = at(2025, 6, 1)
    assert token_expiry(NEW_YEAR_2026, None, now) == NEW_YEAR_2026
    assert token_expiry(None, "1yr", now) == at(2026, 6, 1)
    assert token_expiry(NEW_YEAR_2026, "1yr", now) == NEW_YEAR_2026  # valid_until wins
    with pytest.raises(ApplianceError, match="unknown unit") as info:
        token_expiry(NEW_YEAR_2026, "1fortnight", now)  # but the duration is still checked, as Backend.AI's model does
    assert info.value.param == "duration"
    with pytest.raises(ApplianceError, match="valid_until .* or duration") as info:
        token_expiry(None, None, now)
    assert info.value.code == "invalid_expiry"


@pytest.mark.parametrize("past", [at(2025, 5, 31), at(2025, 6, 1), "2025-05-31T23:59:59Z", "2025-06-01T08:59:59+09:00", 0, -1])
def test_token_expiry_in_the_past_is_refused(past: str | float) -> None:
    with pytest.raises(ApplianceError, match="cannot be in the past") as info:
        token_expiry(past, None, at(2025, 6, 1))
    assert info.value.status == 422 and info.value.code == "invalid_expiry" and info.value.param == "valid_until"


@pytest.mark.parametrize(("valid_until", "duration"), [(10**20, None), (10**400, None), ("1" * 5000, None), (None, "9999yr"),
                                                       (None, "1e400s"), (None, 10**400)])
def test_token_expiry_beyond_year_9999_is_refused(valid_until: Any, duration: Any) -> None:
    with pytest.raises(ApplianceError, match="too far in the future") as info:
        token_expiry(valid_until, duration, at(2025, 6, 1))
    assert info.value.status == 422


# --- through the app, with a clock the test moves ------------------------------------------------------


AppWithClock = Callable[[float], Any]


@pytest.fixture
def start_clocked(launcher: Any, aiohttp_client: Any, make_config: Callable[..., Config]) -> AppWithClock:
    """The real app with in-process workers and a Clock starting at `start` (epoch seconds). The launcher comes
    first so that it is torn down after the app, as in conftest's start_inprocess_app."""

    async def start(start: float) -> tuple[Admin, Clock]:
        clock = Clock(start)
        config = make_config({"workers": WORKERS})
        client = await aiohttp_client(make_app(config, clock=clock, launcher=launcher), server_kwargs={"handler_cancellation": True})

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await async_wait_for(ready, timeout=10, what="/readyz")
        return Admin(client, config), clock

    return start


async def create_token(admin: Admin, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    got, answer = await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body=body)
    assert got == status, (body, answer)
    return answer


async def test_valid_until_as_epoch_int_numeric_string_or_iso_8601(start_clocked: AppWithClock, tmp_path: Path) -> None:
    admin, _ = await start_clocked(at(2025, 6, 1))
    await create(admin, "a", fake_folder(tmp_path, "a"), replicas=0)
    for value in (1767225600, "1767225600", "2026-01-01T09:00:00+09:00", "2026-01-01"):
        tok = await create_token(admin, {"valid_until": value})
        assert tok["expires_at"] == "2026-01-01T00:00:00.000Z" and tok["status"] == "active", value
    tok = await create_token(admin, {"valid_until": 1767225600, "duration": "1yr"})
    assert tok["expires_at"] == "2026-01-01T00:00:00.000Z"  # valid_until wins, as in Backend.AI


@pytest.mark.parametrize(("duration", "expires"), [
    ("1yr", "2028-01-31T12:00"), ("2mo", "2027-03-31T12:00"), ("1mo", "2027-02-28T12:00"), ("90m", "2027-01-31T13:30"),
    ("1.5h", "2027-01-31T13:30"), ("3600", "2027-01-31T13:00"), (3600, "2027-01-31T13:00"), ("2w", "2027-02-14T12:00"),
])
async def test_duration_in_backend_ai_units(start_clocked: AppWithClock, tmp_path: Path, duration: str | int, expires: str) -> None:
    admin, _ = await start_clocked(at(2027, 1, 31, 12))  # a month's last day: 1mo is clamped to February's
    await create(admin, "a", fake_folder(tmp_path, "a"), replicas=0)
    tok = await create_token(admin, {"duration": duration})
    assert tok["expires_at"].startswith(expires), tok["expires_at"]  # to the minute: the clock keeps ticking


async def test_bad_expiry_is_a_422_naming_the_field(start_clocked: AppWithClock, tmp_path: Path) -> None:
    admin, _ = await start_clocked(at(2027, 1, 31, 12))
    await create(admin, "a", fake_folder(tmp_path, "a"), replicas=0)
    for body, code, param, says in (
        ({"valid_until": 1767225600}, "invalid_expiry", "valid_until", "cannot be in the past"),
        ({"valid_until": "2027-01-31T11:59:00Z"}, "invalid_expiry", "valid_until", "cannot be in the past"),
        ({"valid_until": "2027-01-31T20:59:00+09:00"}, "invalid_expiry", "valid_until", "cannot be in the past"),
        ({"valid_until": 1767225600.5}, "invalid_time", "valid_until", "whole number"),
        ({"valid_until": "soon"}, "invalid_time", "valid_until", "ISO 8601"),
        ({"duration": "10ms"}, "invalid_duration", "duration", "unknown unit"),
        ({"duration": "-3d"}, "invalid_duration", "duration", "must be positive"),
        ({"duration": 0}, "invalid_duration", "duration", "must be positive"),
        ({"duration": "1.5mo"}, "invalid_duration", "duration", "whole number"),
        ({"duration": "9999yr"}, "invalid_expiry", "duration", "too far"),
        ({"valid_until": 1800000000, "duration": "7x"}, "invalid_duration", "duration", "unknown unit"),
        ({}, "invalid_expiry", "valid_until", "or duration"),
    ):
        error = (await create_token(admin, body, status=422))["error"]
        assert (error["code"], error["param"]) == (code, param) and says in error["message"], (body, error)
    status, answer = await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body={"valid_until": True})
    assert status == 422 and answer["error"]["code"] == "validation_error"  # JSON booleans are not times
    assert (await admin.call("POST", "/api/v1/endpoints/nope/tokens", json_body={"duration": "1yr"}))[0] == 404


async def test_a_token_is_refused_once_its_time_is_up(start_clocked: AppWithClock, tmp_path: Path) -> None:
    admin, clock = await start_clocked(at(2027, 1, 31, 12))
    await healthy(admin, "a", fake_folder(tmp_path, "a"))
    by_duration = await create_token(admin, {"duration": "90m"})
    by_epoch = await create_token(admin, {"valid_until": int(clock()) + 3600})
    by_month = await create_token(admin, {"duration": "1mo"})
    for tok in (by_duration, by_epoch, by_month):
        assert (await chat(admin, "a", {"Authorization": f"BackendAI {tok['token']}"}))[0] == 200

    clock.advance(3601)  # past the epoch one
    status, body, _ = await chat(admin, "a", bearer(by_epoch["token"]))
    assert status == 401 and body["error"]["code"] == "expired_api_key"
    assert (await chat(admin, "a", bearer(by_duration["token"])))[0] == 200  # 90 minutes are not up yet

    clock.advance(30 * 60)  # past 90 minutes: `m` is minutes, not months
    status, body, _ = await chat(admin, "a", bearer(by_duration["token"]))
    assert status == 401 and body["error"]["code"] == "expired_api_key"
    assert (await chat(admin, "a", bearer(by_month["token"])))[0] == 200

    assert by_month["expires_at"].startswith("2027-02-28T12:0")  # one calendar month from January 31st, 12:00
    clock.advance(datetime.fromisoformat(by_month["expires_at"]).timestamp() - 1 - clock())
    assert (await chat(admin, "a", bearer(by_month["token"])))[0] == 200  # a second before
    clock.advance(2)
    assert (await chat(admin, "a", bearer(by_month["token"])))[0] == 401
    _, listed = await admin.call("GET", "/api/v1/endpoints/a/tokens")
    assert {t["id"]: t["status"] for t in listed["data"]} == {t["id"]: "expired" for t in (by_duration, by_epoch, by_month)}
