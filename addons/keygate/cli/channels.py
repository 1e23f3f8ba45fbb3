"""scripts/channels: add, list, remove and test the upstream channels in gateway.toml (SPEC 8).

    scripts/channels add local --kind ollama --base-url http://127.0.0.1:11434 --models 'llama3.2:*'
    scripts/channels add deepseek --kind openai --base-url https://api.deepseek.com/v1 \\
        --models 'deepseek-*' --api-key-env DEEPSEEK_API_KEY
    scripts/channels list [--format table|json]
    scripts/channels remove NAME
    scripts/channels test NAME

gateway.toml is read with tomllib and written whole with tomli-w, which does not keep
comments; every setting and the order of the channels stay. Each new text is validated the
way the gateway would read it (`keygate.model.settings.parse_settings`) before it is written
atomically. The one exception: an `api_key_env` variable unset in this shell only warns,
because the gateway's own environment is what counts.

`test` talks to the upstream directly with urllib (no proxy from the environment, no
redirects, so the credential never goes anywhere but base_url) and reports status and
latency of a model listing and of a one-token chat. What the upstream answers (model names,
an error body) is shown escaped and cut (keygate.cli.tables): it must not act on the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from keygate.cli.keys import (
    LIST_WIDTH,
    CommaList,
    UserError,
    config_path,
    load_gateway,
    locked,
    note,
    read_text,
    reason,
    run_cli,
    tool_environ,
    write_atomic,
)
from keygate.cli.tables import cell, escape, render_table
from keygate.model.settings import (
    DEFAULT_CONFIG,
    KINDS,
    Channel,
    ConfigError,
    Settings,
    parse_settings,
)

PROG = "channels"
GLOB_CHARS = "*?["
# Quoted strings first, so a '#' inside one is not taken for a comment.
_TOML_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#')


def has_comments(text: str) -> bool:
    """Whether a TOML text has a comment (good enough for gateway.toml: no multi-line strings
    are expected there, and a false positive only prints a note)."""
    return any(m.group() == "#" for m in _TOML_STRING_OR_COMMENT.finditer(text))


# --- reading and writing gateway.toml ---------------------------------------------------------


def load_doc(path: Path) -> tuple[str | None, dict[str, Any]]:
    text = read_text(path)
    if text is None:
        return None, {}
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e} (fix the file first; nothing was changed)") from None


def channel_list(doc: dict[str, Any], path: Path) -> list[Any]:
    channels = doc.get("channels", [])
    if not isinstance(channels, list):
        raise UserError(f"{path}: 'channels' must be an array of tables [[channels]]")
    return channels


def save(path: Path, old_text: str | None, doc: dict[str, Any]) -> Settings:
    """Validate `doc` as the gateway would read it, then write it atomically."""
    new_text = tomli_w.dumps(doc)
    env = tool_environ(doc)
    try:
        settings = parse_settings(new_text, path, environ=env)
    except ConfigError as e:
        raise UserError(f"not changed: {reason(e, path)}") from None
    # gateway.toml holds no secret (credentials stay in the environment): a new file gets
    # the usual 0644; an existing file keeps its mode.
    write_atomic(path, new_text, new_mode=0o644)
    if old_text is not None and has_comments(old_text):
        note(PROG, f"note: {path} was rewritten with tomli-w, which does not keep comments; "
                   "its comments are gone (settings and order are kept)")
    return settings


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


def number(text: str) -> int | float:
    """argparse type for --weight: an int stays an int in the TOML."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def cmd_add(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    with locked(path.parent) if path.parent.is_dir() else contextlib.nullcontext():
        old_text, doc = load_doc(path)
        channels = channel_list(doc, path)
        if any(isinstance(c, dict) and c.get("name") == args.name for c in channels):
            raise UserError(f"channel {args.name!r} already exists in {path} "
                            f"(remove it first to change it)")
        ch: dict[str, Any] = {"name": args.name, "kind": args.kind, "base_url": args.base_url}
        if args.models:
            ch["models"] = list(dict.fromkeys(args.models))
        if args.priority is not None:
            ch["priority"] = args.priority
        if args.weight is not None:
            ch["weight"] = args.weight
        if args.api_key_env:
            ch["api_key_env"] = args.api_key_env
        if args.no_stream_usage:
            ch["stream_usage"] = False
        mapping = parse_map(args.map or [])
        if mapping:
            ch["model_map"] = mapping
        doc["channels"] = [*channels, ch]
        save(path, old_text, doc)
    note(PROG, f"added channel {args.name!r} to {path}")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        note(PROG, f"note: {args.api_key_env} is not set here; the gateway needs it in its own "
                   "environment, or it will refuse to start")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    with locked(path.parent) if path.parent.is_dir() else contextlib.nullcontext():
        old_text, doc = load_doc(path)
        channels = channel_list(doc, path)
        kept = [c for c in channels if not (isinstance(c, dict) and c.get("name") == args.name)]
        if len(kept) == len(channels):
            raise UserError(f"no channel named {args.name!r} in {path}", 1)
        if kept:
            doc["channels"] = kept
        else:
            del doc["channels"]  # no channels: back to mitmdump's reverse-mode target
        save(path, old_text, doc)
    left = "" if kept else "; with no channels left, requests go to mitmdump's reverse target"
    note(PROG, f"removed channel {args.name!r} from {path}{left}")
    return 0


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


def cmd_list(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    settings = load_gateway(path)
    rows = [channel_record(c) for c in settings.channels]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        note(PROG, f"no channels in {path}: every request goes to mitmdump's reverse-mode target")
        return 0
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
    print(render_table(table, max_width=LIST_WIDTH))
    return 0


# --- test ------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool
    status: str  # "200 OK", "401 Unauthorized", "connection refused", ...
    ms: float
    body: bytes = b""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would follow a redirect with the Authorization header, to any host.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener() -> urllib.request.OpenerDirector:
    # No proxy from the environment: the gateway connects directly, so the test does too.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


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
        with _opener().open(req, timeout=timeout) as resp:
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
    text = " ".join(body.decode("utf-8", "replace").split())[:200]
    if secret:
        text = text.replace(secret, "***")
    return text


def say(line: str) -> None:
    """A line of `test`'s report, escaped: it quotes the upstream's answers."""
    print(escape(line))


def cmd_test(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    settings = load_gateway(path)
    ch = next((c for c in settings.channels if c.name == args.name), None)
    if ch is None:
        raise UserError(f"no channel named {args.name!r} in {path}", 1)
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
    listing = fetch(list_url, None, token, args.timeout)
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

    model = args.model or pick_model(ch, models)
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
        chat = fetch(chat_url, body, token, args.timeout)
        line = f"POST {chat_url} (model {cell(model)}) -> {chat.status} in {chat.ms:.1f} ms"
        if not chat.ok and chat.body:
            line += f"; {_snippet(chat.body, token)}"
        say(line)
        chat_ok = chat.ok
    ok = listing.ok and chat_ok
    say(f"{'ok' if ok else 'FAILED'}: channel {ch.name}")
    return 0 if ok else 1


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    config_help = f"gateway.toml to edit (default: $KEYGATE_CONFIG, else {DEFAULT_CONFIG})"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Edit and test the [[channels]] of keygate's gateway.toml. The file is "
                    "rewritten with tomli-w, which DROPS COMMENTS (settings and order are "
                    "kept; a note says when comments were dropped).",
    )
    parser.add_argument("--config", metavar="PATH", default=None, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = sub.add_parser("add", parents=[common], help="add a channel",
                         description="Add channel NAME at the end of gateway.toml's channels. "
                                     "Note: tomli-w rewrites the file without its comments.")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--kind", required=True, choices=KINDS)
    add.add_argument("--base-url", required=True, metavar="URL",
                     help="ollama: the server root; openai: the base URL you would give the "
                          "openai client (e.g. https://api.deepseek.com/v1)")
    add.add_argument("--models", action=CommaList, metavar="A,B",
                     help="glob patterns of model names it serves (default: *)")
    add.add_argument("--map", action="extend", nargs="+", metavar="ALIAS=UPSTREAM",
                     help="model_map entries: requested name -> upstream name")
    add.add_argument("--priority", type=whole, metavar="N",
                     help="higher is tried first (default 0)")
    add.add_argument("--weight", type=number, metavar="N",
                     help="share among channels of equal priority (default 1)")
    add.add_argument("--api-key-env", metavar="VAR",
                     help="environment variable holding the upstream credential (sent as "
                          "Authorization: Bearer); the credential itself is never written")
    add.add_argument("--no-stream-usage", action="store_true",
                     help="do not ask this upstream for usage in OpenAI streams")
    add.set_defaults(func=cmd_add)

    lst = sub.add_parser("list", parents=[common], help="show the channels")
    lst.add_argument("--format", choices=("table", "json"), default="table")
    lst.set_defaults(func=cmd_list)

    rm = sub.add_parser("remove", parents=[common], help="remove a channel",
                        description="Remove channel NAME. Note: tomli-w rewrites the file "
                                    "without its comments.")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=cmd_remove)

    test = sub.add_parser("test", parents=[common], help="check reachability and latency",
                          description="List the upstream's models and send it a one-token "
                                      "chat; print status and latency. Exit 0 when both work.")
    test.add_argument("name", metavar="NAME")
    test.add_argument("--model", metavar="M", help="model for the chat request (default: the "
                      "first model_map target, plain models entry or listed model it serves)")
    test.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="per request (default 60: a cold model may take a while to load)")
    test.set_defaults(func=cmd_test)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
