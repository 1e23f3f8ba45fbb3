"""`keygate channels` (scripts/channels): add, list, remove and test the upstream channels in
gateway.toml (README.md, Commands; docs/configuration.md, Channels).

    keygate channels add local --kind ollama --base-url http://127.0.0.1:11434 --models 'llama3.2:*'
    keygate channels add deepseek --kind openai --base-url https://api.deepseek.com/v1 \\
        --models 'deepseek-*' --api-key-env DEEPSEEK_API_KEY
    keygate channels list [--format table|json]
    keygate channels remove NAME
    keygate channels test NAME

gateway.toml is the operator's file, so an edit changes the channels and nothing else:
tomlkit (round-trip TOML) keeps every comment, blank line, order and spelling. A new
channel goes after the last one; a removed channel takes its header, its settings and the
comments among them, while comment lines after it that a blank line sets apart (a
commented-out example, a note about what follows) stay where they were. Each new text is
validated the way the gateway would read it (`keygate.model.settings.parse_settings`), and
must hold exactly the settings intended, before it is written atomically. The one
exception: an `api_key_env` variable unset in this shell only warns, because the gateway's
own environment is what counts.

`test` talks to the upstream directly with urllib (no proxy from the environment, no
redirects, so the credential never goes anywhere but base_url) and reports status and
latency of a model listing and of a one-token chat. What the upstream answers (model names,
an error body) is shown escaped and cut (keygate.cli.tables): it must not act on the terminal.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import tomlkit
from tomlkit.items import AoT, Array, Comment, Table, Whitespace

from keygate import direct
from keygate.cli.common import (
    DEFAULT_CONFIG,
    LIST_WIDTH,
    Group,
    OneOf,
    UserError,
    comma_list,
    config_option,
    config_path,
    load_gateway,
    locked,
    note,
    read_text,
    reason,
    tool_environ,
    write_atomic,
)
from keygate.cli.tables import cell, escape, render_table
from keygate.model.settings import KINDS, Channel, ConfigError, parse_settings

PROG = "channels"
GLOB_CHARS = "*?["


# --- gateway.toml, edited in place ------------------------------------------------------------


class GatewayFile:
    """gateway.toml three ways: its text, its settings as tomllib reads them (what the edit
    is checked against), and a tomlkit document (what is edited, then rendered)."""

    def __init__(self, path: Path):
        self.path = path
        self.text = read_text(path)
        if self.text is None:
            self.data: dict[str, Any] = {}
            self.doc = tomlkit.document()
            return
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: {e} (fix the file first; nothing was changed)") from None
        try:
            self.doc = tomlkit.parse(self.text)
        except Exception as e:  # tomlkit's errors vary by version; any means "by hand"
            raise UserError(f"{path}: cannot edit this file by machine ({e}); "
                            "edit it by hand") from None
        if self.doc.as_string() != self.text:
            raise UserError(f"{path}: cannot edit this file by machine without changing "
                            "other lines; edit it by hand")
        channels = self.data.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, dict) for c in channels):
            raise UserError(f"{path}: 'channels' must be an array of tables [[channels]]")

    def _tidy(self, text: str) -> str:
        """The edited text with the file's line breaks (tomlkit writes new lines with "\\n";
        a file written with "\\r\\n" alone keeps them), and one line break at its end, as a
        text editor leaves it: an edit at the end must not leave blank lines behind it."""
        crlf = "\r\n" in (self.text or "") and self.text.count("\n") == self.text.count("\r\n")
        text = text.replace("\r\n", "\n") if crlf else text
        text = text.rstrip("\n") + "\n" if text.strip() else ""
        return text.replace("\n", "\r\n") if crlf else text

    def names(self) -> list[Any]:
        return [c.get("name") for c in self.data.get("channels", [])]

    def added(self, channel: dict[str, Any]) -> str:
        """The text with `channel` after the last channel (or at the end of the file)."""
        channels = self.doc.get("channels")
        if channels is None:
            aot = tomlkit.aot()
            aot.append(_table(channel))
            self.doc.append("channels", aot)
        elif isinstance(channels, AoT):
            last = _deepest_last(channels[-1])
            if not last.as_string().endswith("\n\n"):
                last.add(tomlkit.nl())  # a blank line between the last channel and the new one
            channels.append(_table(channel))
        elif isinstance(channels, Array):  # channels = [{...}, ...], inline
            table = tomlkit.inline_table()
            table.update(channel)
            channels.append(table)
        else:
            raise UserError(f"{self.path}: cannot add to this 'channels' by machine; "
                            "edit the file by hand")
        return self._tidy(self.doc.as_string())

    def removed(self, index: int) -> str:
        """The text without channel `index`. Comment lines after its last setting stay
        when a blank line sets them apart from it: they are about the file, not it."""
        old = self.doc.as_string()
        channels = self.doc["channels"]
        if isinstance(channels, Array):
            if len(channels) > 1:
                del channels[index]
            else:
                del self.doc["channels"]
            return self._tidy(self.doc.as_string())
        kept = _file_comments_after(channels[index])
        if len(channels) > 1:
            del channels[index]
        else:
            del self.doc["channels"]  # no channels: back to mitmdump's reverse-mode target
        new = self.doc.as_string()
        cut = _cut(old, new)
        if cut is None:
            raise UserError(f"{self.path}: cannot remove that channel by machine without "
                            "changing other lines; edit the file by hand")
        if not kept:
            return self._tidy(new)
        if cut == 0 or new[:cut].endswith(("\n\n", "\n\r\n")):
            kept = kept.lstrip("\r\n")
        return self._tidy(new[:cut] + kept + new[cut:])


def _table(channel: dict[str, Any]) -> Table:
    """A new [[channels]] table, with a blank line after it, as between the example's
    tables (at the end of the file `_tidy` takes it away again)."""
    table = tomlkit.item(channel)
    _deepest_last(table).add(tomlkit.nl())
    return table


def _deepest_last(table: Table) -> Table:
    """The table whose body is rendered last in `table`: itself, or its last sub-table
    ([channels.model_map]), where the lines before the next header end."""
    while True:
        last = None
        for key, item in table.value.body:
            if key is not None:
                last = item
        if not isinstance(last, Table):
            return table
        table = last


def _file_comments_after(table: Table) -> str:
    """The text of the comment lines after a channel's last setting that a blank line sets
    apart from it (with the blank lines around them), or "" when there are none."""
    body = _deepest_last(table).value.body
    n = len(body)
    while n and body[n - 1][0] is None and isinstance(body[n - 1][1], (Comment, Whitespace)):
        n -= 1
    tail = [item for _, item in body[n:]]
    first_blank = next((i for i, item in enumerate(tail) if isinstance(item, Whitespace)), None)
    if first_blank is None:
        return ""  # comments right under the last setting belong to the channel
    rest = tail[first_blank:]
    if not any(isinstance(item, Comment) for item in rest):
        return ""
    return "".join(item.as_string() for item in rest)


def _cut(old: str, new: str) -> int | None:
    """Where `new` is `old` with one table cut out: the offset in `new` at which the cut
    piece started, at the start of a line with its `[[` header. None if there is no such
    place (then the edit changed more than that table, and is not made)."""
    size = len(old) - len(new)
    if size <= 0:
        return None
    prefix = 0
    limit = len(new)
    while prefix < limit and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit and old[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    for at in range(prefix, max(limit - suffix, 0) - 1, -1):
        if at and old[at - 1] != "\n":
            continue
        if old[at:at + size].lstrip(" \t").startswith("[[") and \
                old[:at] + old[at + size:] == new:
            return at
    return None


def save(gw: GatewayFile, new_text: str, expected: dict[str, Any]) -> None:
    """Validate `new_text` as the gateway would read it, check that it holds exactly the
    `expected` settings, then write it atomically."""
    path = gw.path
    try:
        data = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"not changed: {e}") from None
    try:
        parse_settings(new_text, path, environ=tool_environ(data))
    except ConfigError as e:
        raise UserError(f"not changed: {reason(e, path)}") from None
    if data != expected:
        raise UserError(f"not changed: the edit of {path} did not come out as intended; "
                        "edit the file by hand")
    # gateway.toml holds no secret (credentials stay in the environment): a new file gets
    # the usual 0644; an existing file keeps its mode.
    write_atomic(path, new_text, new_mode=0o644)


# --- add / remove / list ----------------------------------------------------------------------


def parse_map(items: list[str]) -> dict[str, str]:
    """--map ALIAS=UPSTREAM (repeatable, comma-separated too) -> model_map."""
    out: dict[str, str] = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            alias, sep, upstream = pair.partition("=")
            alias, upstream = alias.strip(), upstream.strip()
            if not sep or not alias or not upstream:
                raise UserError(f"--map {pair!r}: expected ALIAS=UPSTREAM, "
                                "e.g. gpt-4o-mini=qwen2.5:7b")
            if alias in out and out[alias] != upstream:
                raise UserError(f"--map: {alias!r} is mapped twice")
            out[alias] = upstream
    return out


class Number(click.ParamType):
    """--weight: a number; an int stays an int in the TOML."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, (int, float)):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)


class Whole(click.ParamType):
    """--priority: a whole number, negative allowed."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)


def _folder_lock(path: Path):
    return locked(path.parent) if path.parent.is_dir() else contextlib.nullcontext()


def add_channel(config: str | None, channel: dict[str, Any]) -> Path:
    path = config_path(config)
    with _folder_lock(path):
        gw = GatewayFile(path)
        if channel["name"] in gw.names():
            raise UserError(f"channel {channel['name']!r} already exists in {path} "
                            f"(remove it first to change it)")
        expected = copy.deepcopy(gw.data)
        expected["channels"] = [*expected.get("channels", []), channel]
        save(gw, gw.added(channel), expected)
    return path


def remove_channel(config: str | None, name: str) -> tuple[Path, int]:
    """Remove channel `name`; returns (path, channels left)."""
    path = config_path(config)
    with _folder_lock(path):
        gw = GatewayFile(path)
        names = gw.names()
        if name not in names:
            raise UserError(f"no channel named {name!r} in {path}", 1)
        index = names.index(name)
        expected = copy.deepcopy(gw.data)
        del expected["channels"][index]
        if not expected["channels"]:
            del expected["channels"]
        save(gw, gw.removed(index), expected)
    return path, len(expected.get("channels", []))


def channel_record(ch: Channel) -> dict[str, Any]:
    """What `list` shows: the settings, never a credential (only the variable's name)."""
    return {
        "name": ch.name,
        "kind": ch.kind,
        "base_url": ch.base_url,
        "models": list(ch.models),
        "model_map": dict(ch.model_map),
        "priority": ch.priority,
        "weight": int(ch.weight) if ch.weight.is_integer() else ch.weight,
        "api_key_env": ch.api_key_env,
        "api_key_set_here": bool(ch.api_key_env and os.environ.get(ch.api_key_env)),
        "stream_usage": ch.stream_usage,
    }


def list_table(rows: list[dict[str, Any]]) -> str:
    header = ["NAME", "KIND", "BASE_URL", "MODELS", "MODEL_MAP", "PRIORITY", "WEIGHT",
              "API_KEY_ENV", "STREAM_USAGE"]
    table = [header] + [
        [
            r["name"], r["kind"], r["base_url"], ",".join(r["models"]),
            ",".join(f"{a}={u}" for a, u in r["model_map"].items()) or "-",
            str(r["priority"]), str(r["weight"]),
            (r["api_key_env"] + ("" if r["api_key_set_here"] else " (unset here)"))
            if r["api_key_env"] else "-",
            "yes" if r["stream_usage"] else "no",
        ]
        for r in rows
    ]
    return render_table(table, max_width=LIST_WIDTH)


# --- test ------------------------------------------------------------------------------------


STATUS_WIDTH = 80  # an upstream chooses its reason phrase (up to 64 KB in a status line)


@dataclass
class Result:
    ok: bool
    status: str  # "200 OK", "401 Unauthorized", "connection refused", ...
    ms: float
    body: bytes = b""

    def __post_init__(self) -> None:
        self.status = cell(self.status, STATUS_WIDTH)


def fetch(url: str, body: dict | None, token: str | None, timeout: float) -> Result:
    headers = {"Accept": "application/json", "User-Agent": "keygate-channels-test"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    t0 = time.perf_counter()
    try:
        with direct.opener().open(req, timeout=timeout) as resp:
            payload = resp.read(8 * 1024 * 1024)
            ms = (time.perf_counter() - t0) * 1000
            return Result(200 <= resp.status < 300, f"{resp.status} {resp.reason}", ms, payload)
    except urllib.error.HTTPError as e:
        ms = (time.perf_counter() - t0) * 1000
        try:
            payload = e.read(64 * 1024)
        except Exception:  # the error body is a courtesy; the status is what matters
            payload = b""
        return Result(False, f"{e.code} {e.reason}", ms, payload)
    except urllib.error.URLError as e:
        ms = (time.perf_counter() - t0) * 1000
        why = e.reason
        text = getattr(why, "strerror", None) or str(why)
        if isinstance(why, ConnectionRefusedError):
            text = "connection refused"
        elif isinstance(why, TimeoutError):
            text = f"timed out after {timeout:g} s"
        return Result(False, f"failed: {text}", ms)
    except TimeoutError:
        ms = (time.perf_counter() - t0) * 1000
        return Result(False, f"failed: timed out after {timeout:g} s", ms)
    except Exception as e:  # RemoteDisconnected, BadStatusLine, ssl errors...: all "failed"
        ms = (time.perf_counter() - t0) * 1000
        return Result(False, f"failed: {type(e).__name__}: {e}", ms)


def listed_models(kind: str, body: bytes) -> list[str] | None:
    """Model names from /api/tags (ollama) or /models (openai); None if not such a list."""
    try:
        doc = json.loads(body)
        if kind == "ollama":
            names = [m.get("model") or m["name"] for m in doc["models"]]
        else:
            names = [m["id"] for m in doc["data"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return names if all(isinstance(n, str) for n in names) else None


def pick_model(ch: Channel, listed: list[str] | None) -> str | None:
    """The model to send a one-token chat to: a model_map target, else a plain (non-glob)
    models entry, else the first listed model this channel serves."""
    for target in ch.model_map.values():
        return target
    for pattern in ch.models:
        if not any(c in pattern for c in GLOB_CHARS):
            return pattern
    for name in listed or []:
        if ch.serves(name):
            return name
    return None


def _snippet(body: bytes, secret: str | None) -> str:
    """The start of an upstream's answer, for the report: the channel's credential taken out
    before the cut (a cut across it would leave part of it), the cut marked."""
    text = body.decode("utf-8", "replace")
    if secret:
        text = text.replace(secret, "***")
    return cell(" ".join(text.split()), 200)


def say(line: str) -> None:
    """A line of `test`'s report, escaped: it quotes the upstream's answers."""
    print(escape(line))


def check_channel(config: str | None, name: str, model: str | None, timeout: float) -> int:
    """`channels test`: list the upstream's models, send it a one-token chat, report both."""
    path = config_path(config)
    settings = load_gateway(path)
    ch = next((c for c in settings.channels if c.name == name), None)
    if ch is None:
        raise UserError(f"no channel named {name!r} in {path}", 1)
    token = None
    if ch.api_key_env:
        token = os.environ.get(ch.api_key_env) or None
        if token is None:
            note(PROG, f"note: {ch.api_key_env} is not set here; testing without a credential")
    base = ch.base_url.rstrip("/")
    if ch.kind == "ollama":
        list_url, chat_url = base + "/api/tags", base + "/api/chat"
    else:
        list_url, chat_url = base + "/models", base + "/chat/completions"

    say(f"channel {ch.name}: {ch.kind} at {ch.base_url}"
        + (f" (credential from ${ch.api_key_env})" if token else ""))
    listing = fetch(list_url, None, token, timeout)
    models = listed_models(ch.kind, listing.body) if listing.ok else None
    line = f"GET  {list_url} -> {listing.status} in {listing.ms:.1f} ms"
    if listing.ok and models is None:
        listing.ok = False
        line += "; the answer is not a model list"
    elif models is not None:
        shown = ", ".join(cell(m) for m in models[:5]) + (", ..." if len(models) > 5 else "")
        line += f"; {len(models)} model{'s' if len(models) != 1 else ''}"
        line += f": {shown}" if models else ""
    elif listing.body:
        line += f"; {_snippet(listing.body, token)}"
    say(line)

    model = model or pick_model(ch, models)
    if model is None:
        say(f"POST {chat_url} -> skipped: no model to try (give one with --model)")
        chat_ok = False
    else:
        messages = [{"role": "user", "content": "hi"}]
        if ch.kind == "ollama":
            body = {"model": model, "messages": messages, "stream": False,
                    "options": {"num_predict": 1}}
        else:
            body = {"model": model, "messages": messages, "max_tokens": 1}
        chat = fetch(chat_url, body, token, timeout)
        line = f"POST {chat_url} (model {cell(model)}) -> {chat.status} in {chat.ms:.1f} ms"
        if not chat.ok and chat.body:
            line += f"; {_snippet(chat.body, token)}"
        say(line)
        chat_ok = chat.ok
    ok = listing.ok and chat_ok
    say(f"{'ok' if ok else 'FAILED'}: channel {ch.name}")
    return 0 if ok else 1


# --- command line ------------------------------------------------------------------------------

CONFIG_HELP = f"gateway.toml to edit (default: $KEYGATE_CONFIG, else {DEFAULT_CONFIG})"


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of NAME: the channels in gateway.toml."""
    try:
        settings = load_gateway(config_path(ctx.params.get("config")))
    except Exception:  # completion must never print an error into the operator's prompt
        return []
    return [c.name for c in settings.channels if c.name.startswith(incomplete)]


@click.group("channels", cls=Group)
@config_option(CONFIG_HELP)
def cli(config: str | None) -> None:
    """Edit and test the [[channels]] of keygate's gateway.toml. Edits keep the file's
    comments, order and formatting: only the channel added or removed changes."""


@cli.command("add", short_help="add a channel")
@click.argument("name", metavar="NAME")
@click.option("--kind", required=True, type=OneOf(KINDS), help="the upstream's API")
@click.option("--base-url", required=True, metavar="URL",
              help="ollama: the server root; openai: the base URL you would give the openai "
                   "client (e.g. https://api.deepseek.com/v1)")
@click.option("--models", multiple=True, callback=comma_list, metavar="A,B",
              help="glob patterns of model names it serves (default: *)")
@click.option("--map", "mapping", multiple=True, metavar="ALIAS=UPSTREAM",
              help="model_map entries: requested name -> upstream name (comma-separated, "
                   "may repeat)")
@click.option("--priority", type=Whole(), metavar="N", help="higher is tried first (default 0)")
@click.option("--weight", type=Number(), metavar="N",
              help="share among channels of equal priority (default 1)")
@click.option("--api-key-env", metavar="VAR",
              help="environment variable holding the upstream credential (sent as "
                   "Authorization: Bearer); the credential itself is never written")
@click.option("--no-stream-usage", is_flag=True,
              help="do not ask this upstream for usage in OpenAI streams")
@config_option(CONFIG_HELP)
def add_command(name: str, kind: str, base_url: str, models: list[str], mapping: tuple[str, ...],
                priority: int | None, weight: int | float | None, api_key_env: str | None,
                no_stream_usage: bool, config: str | None) -> int:
    """Add channel NAME after the last channel of gateway.toml; the rest of the file stays
    as it is, comments included."""
    channel: dict[str, Any] = {"name": name, "kind": kind, "base_url": base_url}
    if models:
        channel["models"] = list(dict.fromkeys(models))
    if priority is not None:
        channel["priority"] = priority
    if weight is not None:
        channel["weight"] = weight
    if api_key_env:
        channel["api_key_env"] = api_key_env
    if no_stream_usage:
        channel["stream_usage"] = False
    model_map = parse_map(list(mapping))
    if model_map:
        channel["model_map"] = model_map
    path = add_channel(config, channel)
    note(PROG, f"added channel {name!r} to {path}")
    if api_key_env and not os.environ.get(api_key_env):
        note(PROG, f"note: {api_key_env} is not set here; the gateway needs it in its own "
                   "environment, or it will refuse to start")
    return 0


@cli.command("list", short_help="show the channels")
@click.option("--format", "fmt", type=OneOf(("table", "json")), default="table",
              help="output format (table)")
@config_option(CONFIG_HELP)
def list_command(fmt: str, config: str | None) -> int:
    """Show the channels of gateway.toml; never a credential, only the name of the variable
    that holds it."""
    path = config_path(config)
    rows = [channel_record(c) for c in load_gateway(path).channels]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif not rows:
        note(PROG, f"no channels in {path}: every request goes to mitmdump's reverse-mode target")
    else:
        print(list_table(rows))
    return 0


@cli.command("remove", short_help="remove a channel")
@click.argument("name", metavar="NAME", shell_complete=_complete_names)
@config_option(CONFIG_HELP)
def remove_command(name: str, config: str | None) -> int:
    """Remove channel NAME: its header, its settings and the comments among them. The rest
    of the file stays as it is."""
    path, left = remove_channel(config, name)
    tail = "" if left else "; with no channels left, requests go to mitmdump's reverse target"
    note(PROG, f"removed channel {name!r} from {path}{tail}")
    return 0


@cli.command("test", short_help="check reachability and latency")
@click.argument("name", metavar="NAME", shell_complete=_complete_names)
@click.option("--model", metavar="M", help="model for the chat request (default: the first "
              "model_map target, plain models entry or listed model it serves)")
@click.option("--timeout", type=float, default=60.0, metavar="SECONDS",
              help="per request (default 60: a cold model may take a while to load)")
@config_option(CONFIG_HELP)
def test_command(name: str, model: str | None, timeout: float, config: str | None) -> int:
    """List the upstream's models and send it a one-token chat; print status and latency.
    Exit 0 when both work."""
    return check_channel(config, name, model, timeout)
