"""`keygate usage` (scripts/usage): totals from the usage log (README.md, Commands;
docs/usage-log.md).

    keygate usage [--config PATH] [--log PATH] [--since 30m|24h|7d|DATE] [--until ..]
                  [--by key,model,channel,day,month] [--format table|json|toml]

The counting is keygate.accounting.totals (pure, shared with what else shows totals), over
the log's hour cache (keygate.accounting.hourcache: exactly what reading every line gives,
docs/usage-log.md#the-hour-cache), which a query brings up to date; this module reads the
command line and prints. Garbage and a torn last line in the log are
skipped and counted on stderr.

Group values are what clients sent (a model name is any string a valid key sends), so no
output passes them through raw: the table escapes and cuts them (keygate.cli.tables), and the
JSON and TOML texts write the characters a terminal would act on as escapes.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from keygate.accounting.hourcache import HourCache
from keygate.accounting.totals import (
    COUNTERS,
    GROUPS,
    Row,
    Totals,
    canonical,
    parse_by,
    total,
)
from keygate.cli.common import DEFAULT_CONFIG, Command, OneOf, note
from keygate.cli.tables import escape_encoded, escape_surrogates, render_table
from keygate.model.prices import json_with_money, money_text
from keygate.times import parse_when

PROG = "usage"
FORMATS = ("table", "json", "toml")
MAX_GROUP_WIDTH = 60  # columns of a group value in a table; longer ones are cut, marked
KEY_NAME_MAX = 128  # the longest key name keys.yaml allows


# --------------------------------------------------------------------------- output


def _row_dict(row: Row, by: tuple[str, ...]) -> dict[str, Any]:
    d: dict[str, Any] = dict(zip(by, row.group))
    d.update((name, getattr(row.totals, name)) for name in COUNTERS)
    d["cost"] = row.totals.cost  # a Decimal, or None when no line had a cost
    return d


def format_json(rows: list[Row], by: tuple[str, ...]) -> str:
    # (a cost as a JSON number with its exact digits)
    text = json_with_money([_row_dict(r, by) for r in rows], indent=2, ensure_ascii=False)
    return escape_encoded(text)  # C1, DEL, bidi and lone surrogates as \uXXXX


def format_toml(rows: list[Row], by: tuple[str, ...]) -> str:
    # tomli-w, not tomlkit: this is a report for any TOML 1.0 reader, and tomlkit writes
    # ESC as TOML 1.1's "\e", which Python 3.11's tomllib cannot read.
    import tomli_w  # only this format needs it

    # TOML has no null: a group value that is null (no key, no model) is left out. Nor
    # has it an escape for a lone surrogate (a byte that was not UTF-8): those show as text.
    table = [{k: escape_surrogates(v) if type(v) is str else v
              for k, v in _row_dict(r, by).items() if v is not None} for r in rows]
    return escape_encoded(tomli_w.dumps({"rows": table}).rstrip("\n"))


def format_table(rows: list[Row], by: tuple[str, ...],
                 max_width: int | None = MAX_GROUP_WIDTH) -> str:
    """Aligned columns, a header and a TOTAL row; "-" stands for null. Without groups
    only the TOTAL row is shown. Group values are escaped and cut at `max_width` columns
    (keygate.cli.tables): a client's model name can neither act on the terminal nor forge or
    widen a row; a key name (at most 128 characters) is never cut."""
    labels = list(by) or [""]
    columns = list(COUNTERS) + ["cost"]
    counters = [_cells(t) for t in [r.totals for r in rows]]
    grid = [labels + columns]
    if by:
        grid += [["-" if v is None else v for v in r.group] + cs for r, cs in zip(rows, counters)]
    whole = total(rows)
    grid.append(["TOTAL"] + [""] * (len(labels) - 1) + _cells(whole))
    caps = [max(max_width, KEY_NAME_MAX) if max_width is not None and name == "key"
            else max_width for name in labels]
    return render_table(grid, right=range(len(labels), len(grid[0])),
                        max_width=caps + [None] * len(columns))


def _cells(t: Totals) -> list[str]:
    """A row's counters, and its cost with every digit it has ("-": no line had one)."""
    cost = "-" if t.cost is None else f"{Decimal(money_text(t.cost)):,f}"
    return [f"{getattr(t, c):,}" for c in COUNTERS] + [cost]


RENDER = {"table": format_table, "json": format_json, "toml": format_toml}


# --------------------------------------------------------------------------- command


def _log_path(log: str | None, config: str | None) -> Path:
    if log:
        return Path(log).expanduser()
    return _settings(config).usage_log


def _settings(config: str | None):
    """gateway.toml as the gateway reads it, but a channel's api_key_env need not be set
    here: the upstream credentials live in the gateway's environment, not the operator's.
    ConfigError (a ValueError) when it does not parse or validate."""
    # Imported here: with --log no config is read at all.
    from keygate.cli.common import UserError, config_path, load_gateway
    from keygate.model.settings import ConfigError

    try:
        return load_gateway(config_path(config))
    except UserError as e:
        raise ConfigError(str(e)) from None


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value, ctx.meta.setdefault("keygate.now", datetime.now(timezone.utc)))
    except ValueError as e:
        raise click.UsageError(str(e), ctx) from None


def _by(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return parse_by(values)
    except ValueError as e:
        raise click.UsageError(str(e), ctx) from None


def _html(ctx: click.Context, out: str, log_path: Path, since: datetime | None,
          until: datetime | None, by: tuple[str, ...], config: str | None) -> int:
    """`--html FILE` (docs/endpoints.md#the-usage-page): the page, its data inside."""
    from keygate.pages import BadQuery, write_report

    try:
        bad = write_report(Path(out).expanduser(), log_path, since, until, by or ("key",),
                           config)
    except BadQuery as e:
        raise click.UsageError(str(e), ctx) from None
    except OSError as e:
        raise click.UsageError(f"cannot write {out}: {e}", ctx) from None
    if bad:
        note(PROG, f"skipped {bad} line{'s' if bad != 1 else ''} of {log_path} that are "
                   "not JSON records")
    note(PROG, f"wrote {out}")
    return 0


def _restore_counters(ctx: click.Context, config: str | None, log: str | None) -> int:
    """`--restore-counters` (docs/shared-state.md#restoring-counters)."""
    from keygate.accounting.restore import restore
    from keygate.accounting.shared import check_url
    from keygate.model.settings import ConfigError

    try:
        settings = _settings(config)
    except ConfigError as e:
        raise click.UsageError(str(e), ctx) from None
    if not settings.redis_url:
        raise click.UsageError(f"{settings.path or 'gateway.toml'} sets no redis_url: there "
                               "are no shared counters to restore", ctx)
    problem = check_url(settings.redis_url)
    if problem is not None:
        raise click.UsageError(f"redis_url: {problem}", ctx)
    import redis

    log_path = Path(log).expanduser() if log else settings.usage_log
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30,
                                  socket_connect_timeout=5)
    try:
        n = restore(client, log_path, only_if_missing=False)
    except (OSError, redis.RedisError) as e:
        raise click.UsageError(f"cannot restore the counters: {type(e).__name__}: "
                               f"{str(e).split('redis://')[0]}", ctx) from None
    finally:
        client.close()
    note(PROG, f"Redis' day, month and total counters of {n} keys rebuilt from the logs of "
               f"{log_path.parent}")
    return 0


EPILOG = """\b
Times: a duration back from now (30m, 24h, 7d, also s and w) or an ISO 8601
date or datetime, UTC when it has no zone; --since is inclusive, --until exclusive.

\b
'errors' counts records with a non-null error; 'cost' is the sum of the lines'
cost, exact, in [gateway] currency ('-' or null where no line had one). Null
group values (no key, model or channel) show as '-' in tables, null in JSON, and
are omitted from TOML rows (TOML has no null).
"""


@click.command("usage", cls=Command, epilog=EPILOG)
@click.option("--config", metavar="PATH",
              help="gateway.toml to take usage_log from (default: $KEYGATE_CONFIG, else "
                   f"{DEFAULT_CONFIG})")
@click.option("--log", metavar="PATH", help="usage log to read instead of the configured one")
@click.option("--since", metavar="WHEN", callback=_when, help="only requests from this time on")
@click.option("--until", metavar="WHEN", callback=_when, help="only requests before this time")
@click.option("--by", multiple=True, metavar="FIELDS", callback=_by,
              help=f"group by {','.join(GROUPS)} (comma-separated, may repeat)")
@click.option("--format", "fmt", type=OneOf(FORMATS), default="table",
              help="output format (table)")
@click.option("--restore-counters", is_flag=True,
              help="set Redis' day, month and total counters (redis_url) to what the logs "
                   "of the usage log's folder say, and print nothing else")
@click.option("--html", "html", metavar="FILE",
              help="write the usage page (the dashboard) with this period's data as one "
                   "static file (default period: the last 7 days), and print nothing else")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log: str | None, since: datetime | None,
        until: datetime | None, by: tuple[str, ...], fmt: str,
        restore_counters: bool = False, html: str | None = None) -> int:
    """Totals of requests, tokens, errors and cost from keygate's usage log (rotated files
    included), grouped as asked."""
    if restore_counters:
        return _restore_counters(ctx, config, log)
    if since and until and since > until:
        raise click.UsageError("--since is after --until", ctx)
    try:
        log_path = _log_path(log, config)
    except ValueError as e:  # keygate.model.settings.ConfigError is a ValueError
        raise click.UsageError(str(e), ctx) from None
    if html:
        return _html(ctx, html, log_path, since, until, by, None if log else (
            config or os.environ.get("KEYGATE_CONFIG") or DEFAULT_CONFIG))
    # From the cache of the log's hours beside it, brought up to date with the lines it
    # does not cover (docs/usage-log.md#the-hour-cache): the same rows as reading every line.
    cache = HourCache(log_path)
    try:
        with cache.survey() as survey:
            rows = survey.rows(by, since and canonical(since), until and canonical(until))
            bad = survey.bad
    except OSError as e:
        raise click.UsageError(f"cannot read {log_path}: {e}", ctx) from None
    if bad:
        lines = f"{bad} line{'s' if bad != 1 else ''}"
        note(PROG, f"skipped {lines} of {log_path} that are not JSON records")
    print(RENDER[fmt](rows, by))
    cache.save()
    return 0
