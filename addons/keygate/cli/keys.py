"""scripts/keys: create, list, revoke, enable, rotate and remove API keys in keys.yaml (SPEC 8).

    scripts/keys add alice --models 'llama3.2:*,gpt-4o-mini' --rpm 60 --expires 2027-01-01
    scripts/keys list [--format table|json]
    scripts/keys revoke|enable|rotate|remove alice

Secrets: a new key is `sk-` + 48 letters/digits from `secrets`; only its sha256 is stored,
and the key itself is printed once, alone on stdout (everything else goes to stderr), so
`KEY=$(scripts/keys add alice)` works. No command takes a secret on its command line.

Editing keeps the operator's file: ruamel.yaml (round-trip) edits one entry at a time and
the result is spliced back into the original text, so every other line stays byte for byte.
That also sidesteps ruamel's habit of attaching a comment written above key B to the end of
key A: an entry's span is worked out from the text, and a comment above B never is part of
A's span. Every new text is validated with `keygate.model.keyring.parse_keys` before it is written
(atomically, keeping the file's mode; a new file gets 0600).

The other scripts/ tools share the small helpers here (config path, lenient settings,
atomic write, folder lock, user errors).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import re
import secrets
import string
import sys
import tempfile
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from keygate.cli.tables import escape, render_table
from keygate.model.keyring import (
    LIMIT_NAMES,
    NAME_RE,
    SCOPES,
    Key,
    KeyRing,
    digest,
    parse_keys,
    parse_when,
)
from keygate.model.settings import (
    DEFAULT_CONFIG,
    ConfigError,
    Settings,
    default_settings,
    parse_settings,
)

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 48
KEYS_HEADER = (
    "# keygate API keys (SPEC 2). Only the sha256 of each key is stored here; the key itself\n"
    "# is shown once, by `scripts/keys add` or `scripts/keys rotate`. Hand edits are fine:\n"
    "# scripts/keys keeps comments and order.\n"
)
PLACEHOLDER = "set-in-the-gateway-environment"
# A list's cells are cut (marked) beyond this many columns: as wide as the longest key name,
# so a name is never cut; a longer list of models is, and `--format json` shows it whole.
LIST_WIDTH = 128


# --- helpers shared with chantool -----------------------------------------------------------


class UserError(Exception):
    """A problem the operator can fix. Printed as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def config_path(arg: str | None) -> Path:
    """--config, else $KEYGATE_CONFIG (hermetic tests), else config/gateway.toml."""
    raw = arg or os.environ.get("KEYGATE_CONFIG") or DEFAULT_CONFIG
    return Path(raw).expanduser().resolve()


def tool_environ(doc: Mapping[str, Any] | None) -> dict[str, str]:
    """os.environ plus a placeholder for every channel api_key_env that is unset here.

    The gateway's own environment holds the upstream credentials, often not the operator's
    shell: a CLI that only edits files must not fail because of that.
    """
    env = dict(os.environ)
    channels = (doc or {}).get("channels")
    if isinstance(channels, list):
        for ch in channels:
            var = ch.get("api_key_env") if isinstance(ch, dict) else None
            if isinstance(var, str) and var and not env.get(var):
                env[var] = PLACEHOLDER
    return env


def read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8", newline="") as f:  # keep "\r\n" as it is
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}", 1) from None


def load_gateway(path: Path) -> Settings:
    """gateway.toml as the gateway reads it, except that unset api_key_env is tolerated."""
    text = read_text(path)
    if text is None:
        return default_settings(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = None  # parse_settings reports it with the file name
    env = tool_environ(doc)
    try:
        return parse_settings(text, path, environ=env)
    except ConfigError as e:
        raise UserError(str(e)) from None


def reason(err: Exception, path: Path) -> str:
    """An error about a text that was never written, without its (meaningless) file:line."""
    msg = str(err)
    if msg.startswith(str(path)):
        msg = re.sub(r"^:(\d+:)?\s*", "", msg[len(str(path)):])
    return msg


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of two tools run at once.

    The lock is on the folder, not the file: the file is replaced by rename, so a lock on
    its inode would protect nothing. Advisory and best effort (released on close).
    """
    fd = None
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def write_atomic(path: Path, text: str, new_mode: int = 0o600) -> None:
    """Replace `path` with `text` so a reader (the gateway's reloader) sees old or new, whole.

    Temp file in the same folder (rename is atomic only within a file system), fsync before
    the rename, the original file's mode and owner kept (a new file gets `new_mode`).
    A symlinked file is written through to its target, keeping the link.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = new_mode, None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                with contextlib.suppress(OSError):  # only root may give a file away
                    os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush does not complain."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def note(prog: str, msg: str) -> None:
    """One line on stderr. Escaped (keygate.cli.tables): a message may quote a file, a log or
    an upstream, and none of that may act on the terminal or start a line of its own."""
    print(f"{prog}: {escape(msg)}", file=sys.stderr)


class CommaList(argparse.Action):
    """`--opt a,b --opt c` -> ["a", "b", "c"]: comma-separated and repeatable."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        new = [v.strip() for v in str(values).split(",") if v.strip()]
        if not new:
            parser.error(f"{option_string} needs at least one value")
        items.extend(new)
        setattr(namespace, self.dest, items)


def count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return n


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
    """--expires: a date stays a date; a datetime is stored in UTC (no zone means UTC)."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            return dt.date.fromisoformat(text.strip())
        return parse_when(text)
    except ValueError:
        raise UserError(f"--expires: {text!r} is not an ISO 8601 date or datetime "
                        "(e.g. 2027-01-01 or 2027-01-01T12:00:00Z)") from None


def _new_entry(args: argparse.Namespace, digest_hex: str):
    from ruamel.yaml.comments import CommentedMap

    entry = CommentedMap()
    entry["key_sha256"] = _quoted(digest_hex)
    entry["enabled"] = not args.disabled
    if args.expires:
        entry["expires_at"] = parse_expiry(args.expires)
    if args.scopes:
        unknown = [s for s in args.scopes if s not in SCOPES]
        if unknown:
            raise UserError(f"unknown scope {unknown[0]!r} (scopes: {', '.join(SCOPES)})")
        entry["scopes"] = _flow(list(dict.fromkeys(args.scopes)), quote=False)
    if args.models:
        entry["models"] = _flow(list(dict.fromkeys(args.models)), quote=True)
    if args.allow_ips:
        entry["allow_ips"] = _flow(list(dict.fromkeys(args.allow_ips)), quote=True)
    limits = {n: getattr(args, n) for n in LIMIT_NAMES if getattr(args, n) is not None}
    if limits:
        entry["limits"] = CommentedMap(limits)
    return entry


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


def _keys_path(args: argparse.Namespace) -> Path:
    return load_gateway(config_path(args.config)).keys_file


def cmd_add(args: argparse.Namespace) -> int:
    if not NAME_RE.fullmatch(args.name):
        raise UserError(f"key name {args.name!r}: use letters, digits, '.', '_', '@' or '-' "
                        "(up to 128, starting with a letter or digit)")
    secret = new_secret()
    entry = _new_entry(args, sha256_hex(secret))  # refuses a bad scope or date before any I/O
    path = _keys_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        kf = KeysFile(path)
        if args.name in kf.ring.by_name:
            raise UserError(f"key {args.name!r} already exists in {path} "
                            f"(use 'rotate {args.name}' for a new secret)")
        new_text = kf.appended(args.name, entry)
        _validated(kf, new_text, lambda r: _others_unchanged(kf, r, args.name)
                   and r.lookup(secret) is r.by_name[args.name])
        write_atomic(path, new_text)
    _warn_if_expired(entry.get("expires_at"))
    note("keys", f"added key {args.name!r} to {path}; it is shown only this once:")
    print(secret, flush=True)
    return 0


def _warn_if_expired(when: Any) -> None:
    if when is not None and parse_when(when) <= dt.datetime.now(dt.timezone.utc):
        note("keys", "note: that expiry is in the past, so the key is already expired")


def _edit(
    args: argparse.Namespace, edit: Callable[[Any], None], change: Callable[[Key], Key]
) -> tuple[Path, bool]:
    """Edit one entry. `change` says what the parsed key must become (and nothing else);
    when the key is that already, the file is left alone. Returns (path, changed)."""
    path = _keys_path(args)
    if not path.parent.is_dir():
        raise UserError(f"no key named {args.name!r}: {path} does not exist", 1)
    with locked(path.parent):
        kf = KeysFile(path)
        if args.name not in kf.ring.by_name:
            raise UserError(f"no key named {args.name!r} in {path}", 1)
        want = change(kf.ring.by_name[args.name])
        if want == kf.ring.by_name[args.name]:
            return path, False
        new_text = kf.replaced(args.name, edit)
        _validated(kf, new_text, lambda r: _others_unchanged(kf, r, args.name)
                   and r.by_name[args.name] == want)
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


def cmd_revoke(args: argparse.Namespace) -> int:
    path, changed = _edit(args, _set_enabled(False), lambda k: replace(k, enabled=False))
    if changed:
        note("keys", f"revoked key {args.name!r} in {path} (enabled: false; 'enable' undoes it)")
    else:
        note("keys", f"key {args.name!r} is already revoked; {path} not changed")
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    path, changed = _edit(args, _set_enabled(True), lambda k: replace(k, enabled=True))
    if changed:
        note("keys", f"enabled key {args.name!r} in {path}")
    else:
        note("keys", f"key {args.name!r} is already enabled; {path} not changed")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    secret = new_secret()
    digest_hex = sha256_hex(secret)

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

    path, _ = _edit(args, edit, lambda k: replace(k, digest=bytes.fromhex(digest_hex)))
    note("keys", f"new secret for key {args.name!r} in {path} (the old one no longer works); "
                 "it is shown only this once:")
    print(secret, flush=True)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    path = _keys_path(args)
    if not path.parent.is_dir():
        raise UserError(f"no key named {args.name!r}: {path} does not exist", 1)
    with locked(path.parent):
        kf = KeysFile(path)
        if args.name not in kf.ring.by_name:
            raise UserError(f"no key named {args.name!r} in {path}", 1)
        new_text = kf.removed(args.name)
        _validated(kf, new_text, lambda r: _others_unchanged(kf, r, args.name, removed=True))
        write_atomic(path, new_text)
    note("keys", f"removed key {args.name!r} from {path}")
    return 0


# --- list --------------------------------------------------------------------------------------


def _usage_today(settings: Settings, names: list[str]) -> dict[str, dict[str, int]] | None:
    """Today's (UTC) requests and tokens per key from the usage log, or None if unknown."""
    try:
        from keygate.accounting.ledger import Ledger
    except ImportError:
        return None  # keygate.ledger not there (yet): list works without usage
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    try:
        ledger = Ledger.load(settings.usage_log, settings.usage_log_keep)
        return {
            n: {
                "requests": int(ledger.requests_on(n, day)),
                "tokens": int(ledger.tokens_on(n, day)),
                "tokens_total": int(ledger.tokens_total(n)),
            }
            for n in names
        }
    except Exception as e:  # an unreadable log must not hide the key list
        note("keys", f"usage not shown: cannot read {settings.usage_log}: {e}")
        return None


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
    }


def _table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return str(v)

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
            " ".join(f"{k}={v}" for k, v in r["limits"].items()) or "-",
            cell(r["requests_today"]),
            cell(r["tokens_today"]),
        ])
    header = ["NAME", "ENABLED", "EXPIRES", "SCOPES", "MODELS", "ALLOW_IPS", "LIMITS",
              "REQ_TODAY", "TOK_TODAY"]
    return render_table([header, *shown], max_width=LIST_WIDTH)


def cmd_list(args: argparse.Namespace) -> int:
    settings = load_gateway(config_path(args.config))
    kf = KeysFile(settings.keys_file, editing=False)
    names = list(kf.ring.by_name)
    usage = _usage_today(settings, names) if names else None
    now = dt.datetime.now(dt.timezone.utc)
    rows = [key_record(k, (usage or {}).get(k.name), now) for k in kf.ring.by_name.values()]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif not rows:
        note("keys", f"no keys in {settings.keys_file} (add one: scripts/keys add NAME)")
    else:
        print(_table(rows))
    return 0


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    config_help = (f"gateway.toml whose keys_file to edit (default: $KEYGATE_CONFIG, else "
                   f"{DEFAULT_CONFIG})")
    # --config is accepted before and after the command; SUPPRESS keeps the subcommand's
    # copy from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)

    parser = argparse.ArgumentParser(
        prog="keys",
        description="Manage keygate's API keys in keys.yaml. Only sha256 digests are stored; "
                    "a new key is printed once, alone on stdout. Comments and order are kept.",
    )
    parser.add_argument("--config", metavar="PATH", default=None, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = sub.add_parser("add", parents=[common], help="create a key and print it once",
                         description="Create key NAME: prints `sk-` + 48 letters/digits alone on "
                                     "stdout (shown only this once); stores only its sha256. "
                                     "List options take comma-separated values and may repeat.")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--models", action=CommaList, metavar="A,B",
                     help="glob patterns of model names the key may use (default: all)")
    add.add_argument("--scopes", action=CommaList, metavar="S,..",
                     help=f"from {', '.join(SCOPES)} (default: inference,models)")
    add.add_argument("--expires", metavar="DATE|DATETIME",
                     help="ISO 8601; a date means 00:00 UTC that day, no zone means UTC")
    add.add_argument("--allow-ips", action=CommaList, metavar="CIDR,..",
                     help="client addresses allowed (default: any)")
    for name in LIMIT_NAMES:
        add.add_argument(f"--{name.replace('_', '-')}", dest=name, type=count, metavar="N",
                         help=f"limit: {name}")
    add.add_argument("--disabled", action="store_true", help="create it disabled (enabled: false)")
    add.set_defaults(func=cmd_add)

    lst = sub.add_parser("list", parents=[common], help="show keys, their policy and today's usage",
                         description="Show every key's policy and today's (UTC) requests and "
                                     "tokens from the usage log. Never shows a secret or digest.")
    lst.add_argument("--format", choices=("table", "json"), default="table")
    lst.set_defaults(func=cmd_list)

    for command, func, text in (
        ("revoke", cmd_revoke, "disable a key (enabled: false); it stays in the file"),
        ("enable", cmd_enable, "enable a key again"),
        ("rotate", cmd_rotate, "give a key a new secret, printed once; name and usage stay"),
        ("remove", cmd_remove, "delete a key and the comment block directly above it"),
    ):
        p = sub.add_parser(command, parents=[common], help=text, description=text)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=func)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str) -> int:
    """Parse, run the chosen command, and turn user errors into one line and a status."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except UserError as e:
        note(prog, str(e))
        return e.code
    except BrokenPipeError:  # `keys list | head`: not an error worth a message
        quiet_stdout()
        return 1
    except OSError as e:
        note(prog, f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e))
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, "keys")


if __name__ == "__main__":
    sys.exit(main())
