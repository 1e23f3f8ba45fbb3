"""A fast reader for the plain block-style YAML that keys.yaml files are written in.

PyYAML needs about 1.5 s for a keys.yaml of 10,000 keys, most of it in its pure-Python
constructor, and keygate must reload such a file in well under a second. This reader
handles only the regular subset that `scripts/keys` writes and people type by hand:
mappings by indentation, `- item` lists, `[a, "b"]` flow lists, and scalars that are
quoted strings, plain words, decimal integers, `true`/`false`, or dates. For anything
else (anchors, tags, multi-line strings, escapes, YAML 1.1's yes/no/on/off...) it returns
None, and the caller uses PyYAML, so the meaning of a file never depends on which reader
read it (tests/test_blockyaml.py compares the two on generated files).

The rule throughout: when in doubt, give up. A document returned is exactly what
`yaml.load(text, Loader=yaml.SafeLoader)` builds, plus the line of every mapping key;
whatever PyYAML would reject, read differently, or word an error about, gets None.

Speed: each line is read on its own by one regular expression (_row), and remembered
(_rows), since a keys.yaml repeats the same lines thousands of times; what is left per
line is putting the entry in its place by indentation (_load).
"""

from __future__ import annotations

import datetime as dt
import re

from yaml.nodes import ScalarNode
from yaml.resolver import Resolver


class Lined(dict):
    """A dict that remembers the line of each of its keys (1-based)."""

    lines: dict


def _lined() -> Lined:
    d = Lined()
    d.lines = {}
    return d


class NotSimple(Exception):
    """The text is outside the subset: read it with PyYAML instead."""


def load(text: str) -> Lined | None:
    """The document as PyYAML would build it, or None when it is outside the subset."""
    if not isinstance(text, str):
        return None
    try:
        return _load(text)
    except NotSimple:
        return None


# --------------------------------------------------------------------------- lines

# Every character outside this set makes the text "not simple": PyYAML's reader rejects
# non-printable characters (it raises; it should be the one to word that), it counts \r,
# \x85, \u2028 and \u2029 as line breaks (our line numbers would drift), tabs have rules
# of their own, and a BOM is skipped at the start but is text elsewhere.
_OUTSIDE = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)

# One line of the subset, as
#   (indent, "-" of a list entry, key of a mapping entry, value as "a string", value as a
#    plain word, rest)
# The two common kinds of value, a double-quoted string without escapes and a word, come
# with at most a comment after them; any other value (a comment alone, [a, b], {}, or
# something to give up on) is the rest of the line. Every line matches: a line that is
# neither `- ...` nor `key: ...` has dash and key empty. Keys and words hold no space, '#'
# or quote (_read_word checks their characters further); ':' is left out of keys so that
# `a:b: c` is no entry `a`.
_LINE = re.compile(
    r"""(\ *)
    (?: (-)(?:\ +|$)
      | ( [^\ \#'":]+ | "[^"\\]*" | '(?:[^']|'')*' ) :(?:\ +|$)
    )?
    (?: (?: ("[^"\\]*") | ([^\ \#'"\[{][^\ \#'"]*) ) (?:\ +(?:\#.*)?)?$
      | (.*)
    )""",
    re.X,
)

# PyYAML gives up on a key longer than this ("could not find expected ':'").
_MAX_KEY = 1024

# A line, read on its own, is a row (indent, name, value, make):
#   name: the key of a mapping entry, or None for a list entry `- value`;
#   value: the entry's value, or _BLOCK for a `key:` whose value is the block below it;
#   make: None, or what turns the stored value into a fresh one (a list from a tuple,
#         a new mapping for {}), as rows are shared and documents must not be.
_BLOCK = object()
_SKIP = (-1, None, None, None)  # a blank line, or a comment


def _fresh_mapping(_: object) -> Lined:
    return _lined()


def _row(line: str) -> tuple:
    """One line read on its own (no context needed in this subset), or NotSimple."""
    if _OUTSIDE.search(line):
        raise NotSimple
    spaces, dash, key, string, word, rest = _LINE.match(line).groups("")
    if string:
        value = string[1:-1]
    elif word:
        value = _word(word)
        if value is NotSimple:
            raise NotSimple
    elif rest and rest[0] != "#":
        value = _value(rest)
    elif dash:
        raise NotSimple  # `- ` alone is None, or a block follows: PyYAML's to read
    else:
        value = _BLOCK
    if not dash and not key:
        if value is not _BLOCK:
            raise NotSimple  # a line that is no entry
        return _SKIP
    make = None
    if value.__class__ is list:
        value, make = tuple(value), list
    elif value.__class__ is Lined:
        value, make = None, _fresh_mapping
    if dash:
        return len(spaces), None, value, make
    if len(key) > _MAX_KEY:
        raise NotSimple
    name = _quoted(key) if key[0] == '"' or key[0] == "'" else _word(key)
    if name.__class__ is not str:
        raise NotSimple  # `yes:`, `1:`, `null:`... are no string keys to PyYAML
    return len(spaces), name, value, make


# Rows of lines already read. A keys.yaml repeats the same lines thousands of times
# (`    enabled: true`, `      - inference`, `    limits:`), so most are found here, also
# when keys.py reads the file one entry at a time. Bounded, like the words cache below:
# at most _MEMO_MAX short lines of the files read last.
_rows: dict[str, tuple] = {}
_MEMO_MAX = 4096
_MEMO_LEN = 256


def _load(text: str) -> Lined:
    rows = _rows
    root = _lined()
    # The open block collections, outermost first, and the column of their entries.
    nodes: list = [root]
    indents = [0]
    node: Lined | list = root
    lines: dict | None = root.lines  # node.lines while node is a mapping, else None
    node_indent = 0
    # A `key:` with nothing after it: its value is the block that follows if that is
    # indented deeper, else None.
    owner: Lined | None = None
    owner_key = None
    for n, line in enumerate(text.split("\n"), 1):
        row = rows.get(line)
        if row is None:
            row = _row(line)
            if len(line) <= _MEMO_LEN:
                if len(rows) >= _MEMO_MAX:
                    rows.clear()  # entry names and digests, mostly: each is read once
                rows[line] = row
        indent, name, value, make = row
        if indent < 0:
            continue

        if owner is not None:
            if indent > node_indent:
                node = [] if name is None else _lined()
                lines = None if name is None else node.lines
                node_indent = indent
                owner[owner_key] = node
                nodes.append(node)
                indents.append(indent)
            owner = None
        if indent != node_indent:
            while indent < indents[-1]:
                nodes.pop()
                indents.pop()
            node, node_indent = nodes[-1], indents[-1]
            lines = None if node.__class__ is list else node.lines
            if indent != node_indent:
                raise NotSimple  # deeper than the block it would belong to, or between two

        if make is not None:
            value = make(value)
        if name is None:
            if lines is not None:
                raise NotSimple  # `- ` among `key:` entries
            node.append(value)
        elif lines is None or name in lines:
            raise NotSimple  # `key:` among `- ` entries, or a duplicate (SafeLoader
            # keeps the last silently; keys.py reports it)
        else:
            lines[name] = n
            if value is _BLOCK:
                node[name] = None
                owner, owner_key = node, name
            else:
                node[name] = value
    if not root:
        raise NotSimple  # nothing but comments: PyYAML's document is None, not {}
    return root


def _value(text: str):
    """What follows `key: ` or `- ` when _LINE did not take it as a "string" or a word:
    it starts with no space, and may end with spaces and a comment."""
    if "#" in text or text[-1] == " ":
        text = _strip_comment(text).rstrip(" ")
    c = text[0]
    if c == '"' or c == "'":
        return _quoted(text)
    if c == "[":
        return _flow_list(text)
    if text == "{}":
        return _lined()
    value = _word(text)
    if value is NotSimple:
        raise NotSimple
    return value


def _strip_comment(text: str) -> str:
    """`text` without a trailing ` # comment`; a '#' inside quotes is no comment.

    `text` starts with no space. Whatever the quotes around a '#' really were, a wrong
    guess here leaves a space or a quote in the value, which no reader below accepts."""
    if "#" not in text:
        return text
    if '"' not in text and "'" not in text:
        i = text.find(" #")
        return text if i < 0 else text[:i]
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch == '"' or ch == "'":
            quote = ch
        elif ch == "#" and text[i - 1] == " ":
            return text[:i]
    return text


# --------------------------------------------------------------------------- scalars


def _quoted(text: str) -> str:
    """A whole "..." or '...' scalar -> its string (no escapes, no line breaks)."""
    q = text[0]
    if len(text) < 2 or text[-1] != q:
        raise NotSimple
    inner = text[1:-1]
    if q not in inner and "\\" not in inner:
        return inner
    if q == "'" and "'" not in inner.replace("''", ""):
        return inner.replace("''", "'")
    raise NotSimple  # an escape, or a quote in the middle ("a" "b", 'a' b')


# A flow list of double-quoted strings (what scripts/keys writes): the strings are then
# every other piece between the quotes.
_QUOTED_LIST = re.compile(r'\[ *"[^"\\]*" *(?:, *"[^"\\]*" *)*\]')
# A plain word inside [ ]: PyYAML ends it at , [ ] { } ? and at ':' (6.0) or ': ' (5.x).
_FLOW_WORD = re.compile("[^ #'\",\\[\\]{}:?]+")


def _flow_list(text: str) -> list:
    """`[a, "b", 'c']` -> a list of scalars (no nesting, no trailing comma)."""
    if _QUOTED_LIST.fullmatch(text):
        return text.split('"')[1::2]
    if text[-1] != "]":
        raise NotSimple
    inner = text[1:-1]
    if not inner.strip(" "):
        return []
    try:
        # Splitting at every comma is right unless a quoted item holds one; then some
        # piece starts or ends inside quotes, and _flow_item refuses it.
        return [_flow_item(p.strip(" ")) for p in inner.split(",")]
    except NotSimple:
        if '"' not in inner and "'" not in inner:
            raise
    return [_flow_item(p) for p in _split_flow(inner)]


def _split_flow(inner: str) -> list[str]:
    """The items of a flow list's inside, split at commas outside quotes."""
    items, start, quote = [], 0, None
    for i, ch in enumerate(inner):
        if quote:
            if ch == quote:
                quote = None
        elif ch == '"' or ch == "'":
            quote = ch
        elif ch == ",":
            items.append(inner[start:i].strip(" "))
            start = i + 1
    if quote:
        raise NotSimple
    items.append(inner[start:].strip(" "))
    return items


def _flow_item(text: str):
    if not text:
        raise NotSimple  # [a,,b] or [a,]: PyYAML's to read
    if text[0] == '"' or text[0] == "'":
        return _quoted(text)
    value = _word(text) if _FLOW_WORD.fullmatch(text) else NotSimple
    if value is NotSimple:
        raise NotSimple
    return value


_INT = re.compile("-?(?:0|[1-9][0-9]*)")
_DATE = re.compile("[0-9]{4}-[0-9]{2}-[0-9]{2}")
# A plain word: it starts with no YAML indicator and holds no space, '#' or quote, so
# neither ` #` (a comment) nor `: ` (a mapping) can hide in it, and _strip_comment cannot
# have cut it wrongly. Non-ASCII is fine: _OUTSIDE has already refused what is not.
_PLAIN = re.compile("[A-Za-z0-9_./+\\-\xa0-\U0010ffff][^ #'\"]*")

_STR_TAG = Resolver.DEFAULT_SCALAR_TAG
_resolver = Resolver()
# Resolver.resolve() tries only the implicit resolvers filed under a word's first
# character (and wildcards, filed under None): a word starting with any other character
# (a, k, s, u...: most keys.yaml words) is a string without asking.
_IMPLICIT = Resolver.yaml_implicit_resolvers

# The values of words already read: the same few (setting names, true, false,
# inference, 60...) fill a keys.yaml, also on the lines that are new to _rows.
_words: dict[str, object] = {}


def _word(text: str):
    """A plain word's value as SafeLoader constructs it, or NotSimple (the class, as a
    marker that can be remembered like any value)."""
    value = _words.get(text)
    if value is None:
        value = _read_word(text)
        if len(text) <= _MEMO_LEN:
            if len(_words) >= _MEMO_MAX:
                _words.clear()
            _words[text] = value
    return value


def _read_word(text: str):
    if _INT.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # more digits than int() converts: PyYAML fails the same way
            return NotSimple
    if text == "true" or text == "false":
        return text == "true"
    if _DATE.fullmatch(text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:  # 2027-02-30: SafeLoader raises ValueError
            return NotSimple
    if not _PLAIN.fullmatch(text) or text == "-" or text[-1] == ":":
        return NotSimple  # `-` and `a:` are a list entry and a mapping to YAML
    # Whatever YAML 1.1 reads as something other than a string (yes, null, 0x1f, 1_000,
    # 12:30, 1.5e3 but not 1e3, 2027-1-1...) is PyYAML's to read.
    if (text[0] in _IMPLICIT or None in _IMPLICIT) and \
            _resolver.resolve(ScalarNode, text, (True, False)) != _STR_TAG:
        return NotSimple
    return text
