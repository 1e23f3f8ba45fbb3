"""keygate.times: the one reader of moments, for keys.yaml's expires_at, `keygate keys add
--expires` and `keygate usage --since/--until`."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from keygate import times
from keygate.times import is_date, parse_when

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 26, 12, 0, 0, 500_000, tzinfo=UTC)


@pytest.mark.parametrize("value, expected", [
    ("2027-01-01", dt.datetime(2027, 1, 1, tzinfo=UTC)),
    (" 2027-01-01 ", dt.datetime(2027, 1, 1, tzinfo=UTC)),
    ("2027-01-01T12:30", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("2027-01-01T12:30:00Z", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("2027-01-01t12:30:00z", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("2027-01-01T12:30:00+02:00", dt.datetime(2027, 1, 1, 10, 30, tzinfo=UTC)),
    ("2027-01-01 12:30:00.250-03:00", dt.datetime(2027, 1, 1, 15, 30, 0, 250_000, tzinfo=UTC)),
    (dt.date(2027, 3, 4), dt.datetime(2027, 3, 4, tzinfo=UTC)),
    (dt.datetime(2027, 3, 4, 5), dt.datetime(2027, 3, 4, 5, tzinfo=UTC)),
    (dt.datetime(2027, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
     dt.datetime(2027, 3, 4, 8, tzinfo=UTC)),
])
def test_dates_and_datetimes_become_aware_utc(value, expected):
    got = parse_when(value)
    assert got == expected and got.utcoffset() == dt.timedelta(0)
    assert parse_when(value, NOW) == expected  # the same with durations allowed


def test_what_yaml_makes_of_expires_at_reads_like_the_text():
    for text in ("2027-01-01", "2027-01-01T12:30:00Z", "2027-01-01 12:30:00+02:00"):
        loaded = yaml.safe_load(f"expires_at: {text}")["expires_at"]
        assert not isinstance(loaded, str)  # a date or datetime object
        assert parse_when(loaded) == parse_when(text)


@pytest.mark.parametrize("text, ago", [
    ("90s", dt.timedelta(seconds=90)),
    ("30m", dt.timedelta(minutes=30)),
    ("24h", dt.timedelta(hours=24)),
    ("7d", dt.timedelta(days=7)),
    ("2w", dt.timedelta(weeks=2)),
    (" 0m ", dt.timedelta(0)),
])
def test_durations_count_back_from_now(text, ago):
    assert parse_when(text, NOW) == NOW - ago


@pytest.mark.parametrize("text", ["30d", "24h", "90s"])
def test_no_durations_without_now(text):
    # An expiry of "30d" would have to count forward: keys.yaml says when, not how long.
    with pytest.raises(ValueError, match="is not an ISO 8601 date or datetime"):
        parse_when(text)


@pytest.mark.parametrize("value", ["", "tomorrow", "2027-13-01", "-3d", "5y", "30", "1.5h"])
def test_refusals_name_the_value(value):
    with pytest.raises(ValueError, match="is not an ISO 8601 date or datetime") as e:
        parse_when(value)
    assert repr(value) in str(e.value)
    with pytest.raises(ValueError, match="neither a duration like 30m, 24h, 7d nor an ISO 8601"):
        parse_when(value, NOW)


@pytest.mark.parametrize("value", [5, 1.5, True, None, ["2027-01-01"]])
def test_refuses_what_is_not_a_moment(value):
    with pytest.raises(ValueError, match="is not a date"):
        parse_when(value)


def test_is_date():
    assert is_date("2027-01-01") and is_date(" 2027-01-01\n")
    assert not is_date("2027-01-01T00:00") and not is_date("20270101") and not is_date("7d")


def test_one_parser_everywhere():
    """keys.yaml, `keys add --expires` and `usage --since/--until` read moments with the
    very same function."""
    from keygate.accounting import totals
    from keygate.cli import keys, usage
    from keygate.model import keyring

    assert keyring.parse_when is keys.parse_when is usage.parse_when is totals.parse_when \
        is times.parse_when
