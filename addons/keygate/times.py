"""Moments in time as operators write them, read one way everywhere: keys.yaml's
`expires_at`, `keygate keys add --expires` and `keygate usage --since/--until`.

A date means 00:00 UTC that day; a datetime without a zone is UTC; every result is an
aware datetime in UTC, so moments from the files, the command line and the usage log
compare directly. Pure and dependency-free: the model (keygate.model.keyring) and the
commands (keygate.cli) both import it, and neither imports the other.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

UTC = dt.timezone.utc
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def is_date(text: str) -> bool:
    """Whether `text` is a plain date (2027-01-01), which a key's expiry keeps as a date."""
    return bool(_DATE.fullmatch(text.strip()))


def parse_when(value: Any, now: dt.datetime | None = None) -> dt.datetime:
    """A date (00:00 UTC that day) or an ISO 8601 datetime (UTC when it has no zone) -> an
    aware datetime in UTC. `value` is text, or the date or datetime YAML makes of it.

    With `now`, a duration back from it is accepted too: `90s`, `30m`, `24h`, `7d`, `2w`
    (what `--since 24h` means). Without it a duration is refused: an expiry of "30d" would
    have to count forward, and keys.yaml says when, not how long.

    ValueError with a message for the operator otherwise.
    """
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if now is not None:
            m = _DURATION.fullmatch(text)
            if m:
                return now - dt.timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            if now is not None:
                raise ValueError(f"{value!r} is neither a duration like 30m, 24h, 7d nor an "
                                 "ISO 8601 date or datetime") from None
            raise ValueError(f"{value!r} is not an ISO 8601 date or datetime") from None
    else:
        raise ValueError(f"{value!r} is not a date")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
