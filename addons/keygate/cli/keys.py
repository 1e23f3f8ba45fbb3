"""`keygate keys` (scripts/keys): create, list, revoke, enable, rotate and remove API keys in
keys.yaml (README.md, Commands; docs/configuration.md, Keys).

    keygate keys add alice --models 'llama3.2:*,gpt-4o-mini' --rpm 60 --expires 2027-01-01
    keygate keys list [--format table|json]
    keygate keys revoke|enable|rotate|remove alice

Secrets: a new key is `sk-` + 48 letters/digits from `secrets`; only its sha256 is stored,
and the key itself is printed once, alone on stdout (everything else goes to stderr), so
`KEY=$(keygate keys add alice)` works. No command takes a secret on its command line.

Editing keeps the operator's file: ruamel.yaml (round-trip) edits one entry at a time and
the result is spliced back into the original text, so every other line stays byte for byte.
That also sidesteps ruamel's habit of attaching a comment written above key B to the end of
key A: an entry's span is worked out from the text, and a comment above B never is part of
A's span. Every new text is validated with `keygate.model.keyring.parse_keys` before it is written
(atomically, keeping the file's mode; a new file gets 0600).
"""

from __future__ import annotations

import datetime as dt
import io
import re
import secrets
import string
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

import click
import yaml

from keygate.cli.common import (
    COUNT,
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
    write_atomic,
)
from keygate.cli.tables import render_table
from keygate.model.keyring import (
    LIMIT_NAMES,
    MONEY_LIMITS,
    NAME_RE,
    SCOPES,
    Key,
    KeyRing,
    digest,
    parse_keys,
)
from keygate.model.prices import json_with_money, money_text
from keygate.model.settings import ConfigError, Settings
from keygate.times import is_date, parse_when

PROG = "keys"
KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 48
KEYS_HEADER = (
    "# keygate API keys (docs/configuration.md). Only the sha256 of each key is stored\n"
    "# here; the key itself is shown once, by `scripts/keys add` or `scripts/keys rotate`.\n"
    "# Hand edits are fine: scripts/keys keeps comments and order.\n"
)


# --- keys.yaml as text plus positions -------------------------------------------------------

# The line breaks PyYAML counts, so its line numbers index this list exactly.
_LINE = re.compile(
    r"[^\r\n\x85\u2028\u2029]*(?:\r\n|[\r\n\x85\u2028\u2029])|[^\r\n\x85\u2028\u2029]+$"
)
_EMPTY_KEYS_LINE = re.compile(r"^keys\s*:\s*(?:~|null|Null|NULL|\{\s*\})?\s*(#.*)?$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank(line: str) -> bool:
    return not line.strip()


def _comment(line: str) -> bool:
    return line.lstrip().startswith("#")


class KeysFile:
    """keys.yaml's text, its validated `KeyRing`, and where each entry sits in the text.

    Positions come from PyYAML's composer (fast even with 10,000 keys); ruamel.yaml only
    ever sees one entry's lines, which is what makes splicing safe.
    """

    def __init__(self, path: Path, editing: bool = True):
        self.path = path
        text = read_text(path)
        self.exists = text is not None
        self.text = text or ""
        try:
            self.ring: KeyRing = parse_keys(self.text, path)
        except ConfigError as e:
            raise UserError(f"{e} (fix the file first; nothing was changed)" if editing
                            else str(e)) from None
        self.lines: list[str] = _LINE.findall(self.text)
        self.newline = "\r\n" if "\r\n" in self.text else "\n"
        self.keys_line: int | None = None
        self.keys_node: yaml.Node | None = None
        self.entries: list[tuple[str, int, int]] = []  # (name, line, column), file order
        root = yaml.compose(self.text, Loader=_Loader) if self.text.strip() else None
        if isinstance(root, yaml.MappingNode):
            for knode, vnode in root.value:
                if knode.value == "keys":
                    self.keys_line, self.keys_node = knode.start_mark.line, vnode
        if isinstance(self.keys_node, yaml.MappingNode):
            self.entries = [
                (k.value, k.start_mark.line, k.start_mark.column) for k, _ in self.keys_node.value
            ]

    # -- where things are

    def _editable(self) -> None:
        node = self.keys_node
        if isinstance(node, yaml.MappingNode) and node.value and node.flow_style:
            raise UserError(f"{self.path}: 'keys:' is written in flow style {{...}}; "
                            "scripts/keys edits block style only, edit this file by hand")
        if any(k.tag == "tag:yaml.org,2002:merge" for k, _ in getattr(node, "value", [])):
            raise UserError(f"{self.path}: 'keys:' uses a YAML merge key (<<); edit it by hand")

    def index(self, name: str) -> int:
        for i, (n, _, _) in enumerate(self.entries):
            if n == name:
                return i
        raise UserError(f"no key named {name!r} in {self.path}", 1)

    def span(self, i: int) -> tuple[int, int]:
        """First and last line of entry i: its key line and every line indented deeper.

        A comment written above the next entry is at that entry's column or shallower, so
        it is never part of this span (ruamel would have attached it to this entry).
        """
        _, line, col = self.entries[i]
        stop = self.entries[i + 1][1] if i + 1 < len(self.entries) else len(self.lines)
        end = line
        for j in range(line + 1, stop):
            if not _blank(self.lines[j]) and _indent(self.lines[j]) > col:
                end = j
        return line, end

    def leading_start(self, i: int) -> int:
        """First line of the comment block directly above entry i (no blank line between):
        it describes that entry, so it goes when the entry goes."""
        _, line, col = self.entries[i]
        s = line
        floor = self.keys_line if self.keys_line is not None else -1
        while s - 1 > floor and _comment(self.lines[s - 1]) and _indent(self.lines[s - 1]) <= col:
            s -= 1
        return s

    def mapping_indent(self) -> int:
        """How far the file indents a nested mapping (from its first multi-line entry)."""
        for i, (_, line, col) in enumerate(self.entries):
            first, end = self.span(i)
            for j in range(first + 1, end + 1):
                if not _blank(self.lines[j]) and not _comment(self.lines[j]):
                    return max(1, _indent(self.lines[j]) - col)
        return self.entries[0][2] if self.entries and self.entries[0][2] else 2

    # -- edits, each returning the complete new text

    def replaced(self, name: str, edit: Callable[[Any], None]) -> str:
        """Apply `edit` to the ruamel mapping of entry `name`, splice the result back."""
        self._editable()
        i = self.index(name)
        first, end = self.span(i)
        col = self.entries[i][2]
        chunk = "".join(_dedent(line, col) for line in self.lines[first:end + 1])
        ry = _ruamel()
        try:
            doc = ry.load(chunk)
        except Exception as e:  # ruamel's error classes vary by version; any means "by hand"
            raise UserError(f"{self.path}:{first + 1}: cannot edit key {name!r} by machine "
                            f"(anchors or aliases?): {str(e).splitlines()[0]}; edit it by hand")
        entry = next(iter(doc.values()))
        edit(entry)
        m, s, o = _guess_indent(chunk, self.mapping_indent() if self.entries else 2)
        rendered = _render(ry, doc, m, s, o, col, self.newline)
        return "".join(self.lines[:first] + rendered + self.lines[end + 1:])

    def removed(self, name: str) -> str:
        """The text without entry `name`, its own comment block and its deeper comments."""
        self._editable()
        i = self.index(name)
        start, end = self.leading_start(i), self.span(i)[1]
        before, after = self.lines[:start], self.lines[end + 1:]
        # Keep one blank line where the entry sat between two; none right after "keys:".
        if after and _blank(after[0]) and (
            not before or _blank(before[-1]) or start - 1 == self.keys_line
        ):
            after = after[1:]
        elif not after:
            while before and _blank(before[-1]) and len(before) - 1 != self.keys_line:
                before.pop()
        return "".join(before + after)

    def appended(self, name: str, entry: Any) -> str:
        """The text with a new entry after the last one.

        It goes below any comments that follow the last entry at the entries' column (such
        as a commented-out example) but above a closing comment written further left, which
        reads as being about the whole file.
        """
        self._editable()
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
        doc[name] = entry
        lines = list(self.lines)
        separated = False  # a blank line between entries, if the file has them
        if self.entries:
            last = len(self.entries) - 1
            col, m = self.entries[last][2], self.mapping_indent()
            separated = last > 0 and _blank(self.lines[self.leading_start(last) - 1])
            floor = self.span(last)[1] + 1
        elif self.keys_line is not None:
            col, m, floor = 2, 2, self.keys_line + 1
            match = _EMPTY_KEYS_LINE.match(lines[self.keys_line].rstrip("\r\n"))
            if not match:
                raise UserError(f"{self.path}:{self.keys_line + 1}: cannot add to this 'keys:' "
                                "line by machine; edit the file by hand")
            # "keys: {}" (or null) becomes a block mapping; its comment stays.
            comment = f"  {match.group(1)}" if match.group(1) else ""
            lines[self.keys_line] = "keys:" + comment + self.newline
        else:
            col, m = 2, 2
            if not self.exists:
                lines.append(KEYS_HEADER.replace("\n", self.newline))
            elif lines and not lines[-1].endswith(("\n", "\r")):
                lines[-1] += self.newline
            lines.append("keys:" + self.newline)
            floor = len(lines)
        at = len(lines)
        while at > floor and (_blank(lines[at - 1]) or
                              (_comment(lines[at - 1]) and _indent(lines[at - 1]) < col)):
            at -= 1
        head, tail = lines[:at], lines[at:]
        while len(head) > floor and _blank(head[-1]):
            head.pop()
        if head and not head[-1].endswith(("\n", "\r")):
            head[-1] += self.newline
        if separated:
            head.append(self.newline)
        return "".join(head + _render(_ruamel(), doc, m, m, 0, col, self.newline) + tail)


def _dedent(line: str, col: int) -> str:
    return line[min(col, _indent(line)):]


def _ruamel():
    from ruamel.yaml import YAML

    ry = YAML(typ="rt")
    ry.preserve_quotes = True
    ry.width = 4096  # never fold a long line (a digest, a long model list)
    return ry


def _guess_indent(chunk: str, default_mapping: int) -> tuple[int, int, int]:
    """(mapping, sequence, offset) for ruamel, as this entry's text already uses them."""
    lines = chunk.splitlines()
    mapping = default_mapping
    for line in lines[1:]:
        if not _blank(line) and not _comment(line):
            mapping = max(1, _indent(line))
            break
    sequence, offset = mapping, 0
    parent = None
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- ") and parent is not None:
            offset = max(0, _indent(line) - parent)
            sequence = max(offset + 2, _indent(line) + 2 + _indent(stripped[2:]) - parent)
            break
        if re.sub(r"\s+#.*$", "", stripped).endswith(":"):
            parent = _indent(line)
    return mapping, sequence, offset


def _render(
    ry, doc: Any, mapping: int, sequence: int, offset: int, col: int, newline: str
) -> list[str]:
    """ruamel's rendering of `doc`, moved right to column `col`."""
    ry.indent(mapping=mapping, sequence=sequence, offset=offset)
    buf = io.StringIO()
    ry.dump(doc, buf)
    return [
        (" " * col + line if line.strip() else line).rstrip("\n") + newline
        for line in buf.getvalue().splitlines(keepends=True)
    ]


def _insert_after(m: Any, prev: str, key: str, value: Any) -> None:
    """Insert `key` right after `prev` without stealing the comment above the next field.

    ruamel keeps the comment lines that follow `prev`'s value in `prev`'s own comment
    token; left there they would end up above the inserted field instead of the next one.
    """
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    m.insert(list(m).index(prev) + 1, key, value)
    slot = m.ca.items.get(prev)
    token = slot[2] if slot else None
    if token is None or "\n" not in token.value:
        return
    eol, rest = token.value.split("\n", 1)
    if not rest:
        return
    if eol:
        token.value = eol + "\n"
    else:
        slot[2] = None
    m.ca.items[key] = [None, None, CommentToken("\n" + rest, CommentMark(0), None), None]


# --- commands --------------------------------------------------------------------------------


def new_secret() -> str:
    return "sk-" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def sha256_hex(secret: str) -> str:
    return digest(secret).hex()


def _quoted(value: str):
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    return DoubleQuotedScalarString(value)


def _flow(items: list, quote: bool):
    # Quoted in flow lists because PyYAML (the gateway's reader) cannot read a plain "::1"
    # or "llama3.2:*" there, though ruamel would write them plain.
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq([_quoted(x) if quote else x for x in items])
    seq.fa.set_flow_style()
    return seq


def parse_expiry(text: str) -> dt.date | dt.datetime:
    """--expires: read as keys.yaml's expires_at is (keygate.times); a date stays a date in
    the file, a datetime is stored in UTC."""
    try:
        when = parse_when(text)
    except ValueError:
        raise UserError(f"--expires: {text!r} is not an ISO 8601 date or datetime "
                        "(e.g. 2027-01-01 or 2027-01-01T12:00:00Z)") from None
    return when.date() if is_date(text) else when


def _new_entry(digest_hex: str, models: Iterable[str], scopes: Iterable[str],
               expires: str | None, allow_ips: Iterable[str], limits: dict[str, int],
               disabled: bool):
    from ruamel.yaml.comments import CommentedMap

    entry = CommentedMap()
    entry["key_sha256"] = _quoted(digest_hex)
    entry["enabled"] = not disabled
    if expires:
        entry["expires_at"] = parse_expiry(expires)
    scopes, models, allow_ips = (list(dict.fromkeys(x)) for x in (scopes, models, allow_ips))
    if scopes:
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise UserError(f"unknown scope {unknown[0]!r} (scopes: {', '.join(SCOPES)})")
        entry["scopes"] = _flow(scopes, quote=False)
    if models:
        entry["models"] = _flow(models, quote=True)
    if allow_ips:
        entry["allow_ips"] = _flow(allow_ips, quote=True)
    limits = {n: _yaml_number(limits[n]) for n in LIMIT_NAMES if limits.get(n) is not None}
    if limits:
        entry["limits"] = CommentedMap(limits)
    return entry


def _yaml_number(v: Any) -> Any:
    """A limit as keys.yaml holds it: a budget (a Decimal of at most 15 digits, see Money)
    as a whole number or a float, whose shortest digits are the budget's."""
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


def _validated(kf: KeysFile, new_text: str, expect: Callable[[KeyRing], bool]) -> KeyRing:
    """parse_keys on the complete new text, plus a check that the edit did what was meant
    and nothing else (every other key unchanged)."""
    try:
        ring = parse_keys(new_text, kf.path)
    except ConfigError as e:
        raise UserError(f"not changed: {reason(e, kf.path)}") from None
    if not expect(ring):
        raise UserError(f"not changed: the edit of {kf.path} did not come out as intended; "
                        "edit the file by hand")
    return ring


def _others_unchanged(kf: KeysFile, new: KeyRing, name: str, removed: bool = False) -> bool:
    old = {n: k for n, k in kf.ring.by_name.items() if n != name}
    rest = {n: k for n, k in new.by_name.items() if n != name}
    return old == rest and (name not in new.by_name) == removed


def keys_path(config: str | None) -> Path:
    """The keys_file of gateway.toml `config` (keygate.cli.common.config_path's default)."""
    return load_gateway(config_path(config)).keys_file


def add_key(config: str | None, name: str, *, models: Iterable[str] = (),
            scopes: Iterable[str] = (), expires: str | None = None,
            allow_ips: Iterable[str] = (), limits: dict[str, int] | None = None,
            disabled: bool = False) -> tuple[Path, str, Any]:
    """Create key `name` in the keys file of gateway.toml `config`, printing nothing.
    Returns (keys file, the new secret, its expiry as stored). `keygate serve` makes its
    first key with this too."""
    if not NAME_RE.fullmatch(name):
        raise UserError(f"key name {name!r}: use letters, digits, '.', '_', '@' or '-' "
                        "(up to 128, starting with a letter or digit)")
    secret = new_secret()
    # Refuses a bad scope or date before any I/O.
    entry = _new_entry(sha256_hex(secret), models, scopes, expires, allow_ips, limits or {},
                       disabled)
    path = keys_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        kf = KeysFile(path)
        if name in kf.ring.by_name:
            raise UserError(f"key {name!r} already exists in {path} "
                            f"(use 'rotate {name}' for a new secret)")
        new_text = kf.appended(name, entry)
        _validated(kf, new_text, lambda r: _others_unchanged(kf, r, name)
                   and r.lookup(secret) is r.by_name[name])
        write_atomic(path, new_text)
    return path, secret, entry.get("expires_at")


def _warn_if_expired(when: Any) -> None:
    if when is not None and parse_when(when) <= dt.datetime.now(dt.timezone.utc):
        note(PROG, "note: that expiry is in the past, so the key is already expired")


def _edit(
    config: str | None, name: str, edit: Callable[[Any], None], change: Callable[[Key], Key]
) -> tuple[Path, bool]:
    """Edit one entry. `change` says what the parsed key must become (and nothing else);
    when the key is that already, the file is left alone. Returns (path, changed)."""
    path = keys_path(config)
    if not path.parent.is_dir():
        raise UserError(f"no key named {name!r}: {path} does not exist", 1)
    with locked(path.parent):
        kf = KeysFile(path)
        if name not in kf.ring.by_name:
            raise UserError(f"no key named {name!r} in {path}", 1)
        want = change(kf.ring.by_name[name])
        if want == kf.ring.by_name[name]:
            return path, False
        new_text = kf.replaced(name, edit)
        _validated(kf, new_text, lambda r: _others_unchanged(kf, r, name)
                   and r.by_name[name] == want)
        write_atomic(path, new_text)
    return path, True


def _set_enabled(value: bool) -> Callable[[Any], None]:
    def edit(entry: Any) -> None:
        if "enabled" in entry:
            entry["enabled"] = value
        else:
            secret_field = "key_sha256" if "key_sha256" in entry else "key"
            _insert_after(entry, secret_field, "enabled", value)

    return edit


def _rotated(digest_hex: str) -> Callable[[Any], None]:
    def edit(entry: Any) -> None:
        if "key_sha256" in entry:
            entry["key_sha256"] = _quoted(digest_hex)
            return
        # A plaintext `key:` becomes `key_sha256:` in the same place, with its comments.
        pos = list(entry).index("key")
        comment = entry.ca.items.pop("key", None)
        del entry["key"]
        entry.insert(pos, "key_sha256", _quoted(digest_hex))
        if comment is not None:
            entry.ca.items["key_sha256"] = comment

    return edit


def remove_key(config: str | None, name: str) -> Path:
    path = keys_path(config)
    if not path.parent.is_dir():
        raise UserError(f"no key named {name!r}: {path} does not exist", 1)
    with locked(path.parent):
        kf = KeysFile(path)
        if name not in kf.ring.by_name:
            raise UserError(f"no key named {name!r} in {path}", 1)
        new_text = kf.removed(name)
        _validated(kf, new_text, lambda r: _others_unchanged(kf, r, name, removed=True))
        write_atomic(path, new_text)
    return path


# --- list --------------------------------------------------------------------------------------


def _usage_today(settings: Settings, names: list[str]) -> dict[str, dict[str, Any]] | None:
    """Today's (UTC) requests and tokens per key from the usage log, with its spend (the
    lines' cost) today, this month and in total; None if unknown."""
    try:
        from keygate.accounting.ledger import Ledger
    except ImportError:
        return None  # keygate.accounting.ledger not there: list works without usage
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    try:
        from keygate.accounting.log import log_family

        # The folder's logs together: usage.jsonl and, under `serve --workers`, each
        # worker's own (docs/shared-state.md).
        ledgers = [Ledger.load(p, settings.usage_log_keep)
                   for p in log_family(settings.usage_log)]
        return {
            n: {
                "requests": sum(int(g.requests_on(n, day)) for g in ledgers),
                "tokens": sum(int(g.tokens_on(n, day)) for g in ledgers),
                "tokens_total": sum(int(g.tokens_total(n)) for g in ledgers),
                "spent_today": _spent(g.spent_on(n, day) for g in ledgers),
                "spent_month": _spent(g.spent_in_month(n, day[:7]) for g in ledgers),
                "spent_total": _spent(g.spent_total(n) for g in ledgers),
            }
            for n in names
        }
    except Exception as e:  # an unreadable log must not hide the key list
        note(PROG, f"usage not shown: cannot read {settings.usage_log}: {e}")
        return None


def _spent(amounts) -> Decimal | None:
    """The sum of the ledgers' spends: None when none of them knows a spend."""
    known = [a for a in amounts if a is not None]
    return sum(known, Decimal(0)) if known else None


def _when(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.time() == dt.time(0):
        return value.date().isoformat()
    return value.isoformat().replace("+00:00", "Z")


def key_record(key: Key, usage: dict[str, int] | None, now: dt.datetime) -> dict[str, Any]:
    """What `list` shows of a key: its policy and usage, never its secret or digest."""
    limits = {n: getattr(key.limits, n) for n in LIMIT_NAMES if getattr(key.limits, n) is not None}
    return {
        "name": key.name,
        "enabled": key.enabled,
        "expires_at": _when(key.expires_at),
        "expired": key.expired(now),
        "scopes": [s for s in SCOPES if s in key.scopes],
        "models": list(key.models) if key.models is not None else None,
        "allow_ips": [str(n) for n in key.allow_ips] if key.allow_ips is not None else None,
        "limits": limits,
        "requests_today": usage["requests"] if usage else None,
        "tokens_today": usage["tokens"] if usage else None,
        "tokens_total": usage["tokens_total"] if usage else None,
        "spent_today": usage["spent_today"] if usage else None,
        "spent_month": usage["spent_month"] if usage else None,
        "spent_total": usage["spent_total"] if usage else None,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return money_text(v) if isinstance(v, Decimal) else str(v)

    shown = []
    for r in rows:
        expires = r["expires_at"] or "-"
        shown.append([
            r["name"],
            "yes" if r["enabled"] else "no",
            expires + (" (expired)" if r["expired"] else ""),
            ",".join(r["scopes"]),
            "*" if r["models"] is None else ",".join(r["models"]),
            "any" if r["allow_ips"] is None else ",".join(r["allow_ips"]),
            " ".join(f"{k}={cell(v)}" for k, v in r["limits"].items()) or "-",
            cell(r["requests_today"]),
            cell(r["tokens_today"]),
            cell(r["spent_today"]),
            cell(r["spent_month"]),
            cell(r["spent_total"]),
        ])
    header = ["NAME", "ENABLED", "EXPIRES", "SCOPES", "MODELS", "ALLOW_IPS", "LIMITS",
              "REQ_TODAY", "TOK_TODAY", "SPENT_TODAY", "SPENT_MONTH", "SPENT_TOTAL"]
    return render_table([header, *shown], max_width=LIST_WIDTH)


# --- command line ------------------------------------------------------------------------------

CONFIG_HELP = (f"gateway.toml whose keys_file to edit (default: $KEYGATE_CONFIG, else "
               f"{DEFAULT_CONFIG})")


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of NAME: the keys in the file, never anything about their secrets."""
    try:
        path = keys_path(ctx.params.get("config"))
        ring = parse_keys(read_text(path) or "", path)
    except Exception:  # completion must never print an error into the operator's prompt
        return []
    return [n for n in ring.by_name if n.startswith(incomplete)]


class Money(click.ParamType):
    """A budget: a decimal number >= 0 in [gateway] currency, of at most 15 significant
    digits (so that keys.yaml, which holds it as a YAML number, gives it back exactly)."""

    name = "AMOUNT"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            d = Decimal(str(value).strip())
        except ArithmeticError:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not d.is_finite() or d < 0:
            self.fail(f"{value!r} must be a number >= 0", param, ctx)
        if len(d.normalize().as_tuple().digits) > 15 or abs(d.adjusted()) > 15:
            self.fail(f"{value!r} has more digits than a budget in keys.yaml keeps (15)",
                      param, ctx)
        return d


def _limit_options(f: Callable) -> Callable:
    # Applied last to first, so --help lists them in LIMIT_NAMES' order.
    for name in reversed(LIMIT_NAMES):
        money = name in MONEY_LIMITS
        f = click.option(f"--{name.replace('_', '-')}", name, type=Money() if money else COUNT,
                         metavar="AMOUNT" if money else "N",
                         help=f"limit: {name}" + (" (money, in [gateway] currency)"
                                                  if money else ""))(f)
    return f


@click.group("keys", cls=Group)
@config_option(CONFIG_HELP)
def cli(config: str | None) -> None:
    """Manage keygate's API keys in keys.yaml. Only sha256 digests are stored; a new key is
    printed once, alone on stdout. Comments and order are kept."""


@cli.command("add", short_help="create a key and print it once")
@click.argument("name", metavar="NAME")
@click.option("--models", multiple=True, callback=comma_list, metavar="A,B",
              help="glob patterns of model names the key may use (default: all)")
@click.option("--scopes", multiple=True, callback=comma_list, metavar="S,..",
              help=f"from {', '.join(SCOPES)} (default: inference,models)")
@click.option("--expires", metavar="DATE|DATETIME",
              help="ISO 8601; a date means 00:00 UTC that day, no zone means UTC")
@click.option("--allow-ips", multiple=True, callback=comma_list, metavar="CIDR,..",
              help="client addresses allowed (default: any)")
@_limit_options
@click.option("--disabled", is_flag=True, help="create it disabled (enabled: false)")
@config_option(CONFIG_HELP)
def add_command(name: str, models: list[str], scopes: list[str], expires: str | None,
                allow_ips: list[str], disabled: bool, config: str | None,
                **limits: int | None) -> int:
    """Create key NAME: prints `sk-` + 48 letters/digits alone on stdout (shown only this
    once); stores only its sha256. List options take comma-separated values and may repeat."""
    path, secret, expires_at = add_key(config, name, models=models, scopes=scopes,
                                       expires=expires, allow_ips=allow_ips, limits=limits,
                                       disabled=disabled)
    _warn_if_expired(expires_at)
    note(PROG, f"added key {name!r} to {path}; it is shown only this once:")
    print(secret, flush=True)
    return 0


@cli.command("list", short_help="show keys, their policy and today's usage")
@click.option("--format", "fmt", type=OneOf(("table", "json")), default="table",
              help="output format (table)")
@config_option(CONFIG_HELP)
def list_command(fmt: str, config: str | None) -> int:
    """Show every key's policy, today's (UTC) requests and tokens, and its spend today,
    this month and in total, from the usage log. Never shows a secret or digest."""
    settings = load_gateway(config_path(config))
    kf = KeysFile(settings.keys_file, editing=False)
    names = list(kf.ring.by_name)
    usage = _usage_today(settings, names) if names else None
    now = dt.datetime.now(dt.timezone.utc)
    rows = [key_record(k, (usage or {}).get(k.name), now) for k in kf.ring.by_name.values()]
    if fmt == "json":
        print(json_with_money(rows, indent=2))  # (money as JSON numbers, every digit)
    elif not rows:
        note(PROG, f"no keys in {settings.keys_file} (add one: scripts/keys add NAME)")
    else:
        print(_table(rows))
    return 0


name_argument = click.argument("name", metavar="NAME", shell_complete=_complete_names)


@cli.command("revoke")
@name_argument
@config_option(CONFIG_HELP)
def revoke_command(name: str, config: str | None) -> int:
    """Disable a key (enabled: false); it stays in the file."""
    return _set(name, config, False, "revoked", lambda path: (
        f"revoked key {name!r} in {path} (enabled: false; 'enable' undoes it)"))


@cli.command("enable")
@name_argument
@config_option(CONFIG_HELP)
def enable_command(name: str, config: str | None) -> int:
    """Enable a key again."""
    return _set(name, config, True, "enabled", lambda path: f"enabled key {name!r} in {path}")


def _set(name: str, config: str | None, enabled: bool, word: str,
         done: Callable[[Path], str]) -> int:
    """revoke and enable: set `enabled`, and say what changed (or that nothing did)."""
    path, changed = _edit(config, name, _set_enabled(enabled),
                          lambda k: replace(k, enabled=enabled))
    if changed:
        note(PROG, done(path))
    else:
        note(PROG, f"key {name!r} is already {word}; {path} not changed")
    return 0


@cli.command("rotate")
@name_argument
@config_option(CONFIG_HELP)
def rotate_command(name: str, config: str | None) -> int:
    """Give a key a new secret, printed once; its name, policy and usage stay."""
    secret = new_secret()
    digest_hex = sha256_hex(secret)
    path, _ = _edit(config, name, _rotated(digest_hex),
                    lambda k: replace(k, digest=bytes.fromhex(digest_hex)))
    note(PROG, f"new secret for key {name!r} in {path} (the old one no longer works); "
               "it is shown only this once:")
    print(secret, flush=True)
    return 0


@cli.command("remove")
@name_argument
@config_option(CONFIG_HELP)
def remove_command(name: str, config: str | None) -> int:
    """Delete a key and the comment block directly above it."""
    path = remove_key(config, name)
    note(PROG, f"removed key {name!r} from {path}")
    return 0
