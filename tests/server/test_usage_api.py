"""The usage routes' time parameters: unix seconds or ISO 8601, in UTC, and a 400 naming the
parameter for anything else, including times too near year 1 or 9999 to convert."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tokenmill.server.errors import APIError
from tokenmill.server.usage_api import parse_time


def test_times_are_read_as_unix_seconds_or_iso_8601_and_kept_in_utc():
    utc = timezone.utc
    assert parse_time("1764633600", "start") == datetime(2025, 12, 2, tzinfo=utc)
    assert parse_time("2026-12-02", "start") == datetime(2026, 12, 2, tzinfo=utc)
    assert parse_time("2026-12-02T01:00:00+02:00", "end") == datetime(2026, 12, 1, 23,
                                                                      tzinfo=utc)
    assert parse_time(None, "end") is None


@pytest.mark.parametrize("value", ["yesterday", "0001-01-01T00:00:00+01:00",
                                   "9999-12-31T23:59:59-01:00", "1e300"])
def test_a_time_that_cannot_be_read_or_converted_is_a_400_naming_the_parameter(value):
    with pytest.raises(APIError) as caught:
        parse_time(value, "start")
    assert (caught.value.status, caught.value.param, caught.value.code) == (
        400, "start", "invalid_value")
