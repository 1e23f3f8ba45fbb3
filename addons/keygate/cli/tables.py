"""Text for a terminal from values anyone may have chosen, and the tables of the `keygate`
commands.

`keygate usage` prints model names exactly as clients sent them (a valid key is enough to
put any string in the usage log), `keygate channels test` prints what an upstream answers,
and the keys and channels lists print what a hand-edited file holds. A terminal acts on
what it is given: ESC starts sequences that retitle the window, clear the screen or move
the cursor; BEL rings; CR and LF start a line anywhere, so a value could forge a row of
the table; C1 controls (U+0080-U+009F) are the 8-bit forms of ESC sequences; bidi
overrides and isolates reorder what follows them; a lone surrogate (a byte that was not
UTF-8) makes `print` fail. And one megabyte of name makes a megabyte of table.

So every value shown goes through `escape`, which turns each of those characters into a
visible Python-style escape (`\\x1b`, `\\n`, `\\u202e`, `\\udcff`) and leaves all other text,
non-ASCII letters included, as it is; and every table cell through `cell`, which also cuts
it to a maximum width with a visible mark, `…(+N)`, N being the characters left out.
Backslashes are not doubled: the escapes are for a reader, not for decoding.

`render_table` lays out the tables of `keygate keys`, `keygate channels` and `keygate usage`:
columns two spaces apart, aligned by the width a terminal gives each cell once escaped
(East Asian wide characters take two columns, combining marks none).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Collection, Sequence

MAX_WIDTH = 60  # a cell's default cap, in terminal columns
CUT = "…"

# C0 (TAB, LF and CR included), DEL, C1, the Arabic letter mark, LRM/RLM, the line and
# paragraph separators (lines to some viewers, and to str.splitlines), the bidi
# embeddings, overrides and isolates, and surrogates (only ever lone in a str).
_ABOVE_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f{_ABOVE_C0}]")
# What json.dumps(ensure_ascii=False) or tomli_w may leave unescaped in a string: TAB
# (TOML allows it raw) and all that is not C0.
_UNSAFE_ENCODED = re.compile(f"[\t{_ABOVE_C0}]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(ch: str) -> str:
    named = _NAMED.get(ch)
    if named:
        return named
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape(text: str) -> str:
    """`text` with every character a terminal would act on shown as a visible escape."""
    return _UNSAFE.sub(lambda m: _escaped(m.group()), text)


def escape_surrogates(text: str) -> str:
    """Lone surrogates shown as `\\udcXX` text, for a format that cannot hold them (TOML
    has no escape for them)."""
    return _SURROGATE.sub(lambda m: _escaped(m.group()), text)


def escape_encoded(text: str) -> str:
    """A JSON or TOML text whose strings may still hold TAB, DEL, C1, bidi characters or
    lone surrogates (json.dumps with ensure_ascii=False and tomli_w write them raw), with
    those written as `\\uXXXX` escapes, which read back as the same character. In such a
    text they can only stand inside strings, where the escape means the same. TOML has no
    escape for a surrogate: pass its values through `escape_surrogates` first."""
    return _UNSAFE_ENCODED.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def char_width(ch: str) -> int:
    """Terminal columns of one (safe) character: 0 for combining and format characters,
    2 for East Asian wide and full-width ones, else 1."""
    if ch.isascii():
        return 1
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def width(text: str) -> int:
    """Terminal columns of an escaped text."""
    if text.isascii():
        return len(text)
    return sum(char_width(ch) for ch in text)


def cell(value: str, max_width: int | None = MAX_WIDTH) -> str:
    """`value` escaped and, if wider than `max_width` columns, cut to fit with `…(+N)` at
    the end (N characters of `value` left out). None: no cap.

    Only about `max_width` characters are ever looked at, so a huge value costs no more
    than a short one. Each character counts at least one column towards the cap, so a
    run of zero-width marks is cut too.
    """
    if max_width is None:
        return escape(value)
    if len(value) <= max_width and value.isascii() and value.isprintable():
        return value  # the usual case: nothing to escape, nothing to cut
    pieces: list[str] = []
    costs: list[int] = []
    used = 0
    for ch in value:
        piece = _escaped(ch) if _UNSAFE.match(ch) else ch
        cost = max(1, width(piece))
        if used + cost > max_width:
            break
        pieces.append(piece)
        costs.append(cost)
        used += cost
    else:
        return "".join(pieces)

    def fitting(room: int) -> int:
        kept = used = 0
        for cost in costs:
            if used + cost > room:
                break
            used += cost
            kept += 1
        return kept

    # Keep what leaves room for the mark. Its number shrinks as more is kept, so the room
    # that the first guess's number leaves can only let the second keep more.
    mark = width(CUT) + len("(+)")
    kept = fitting(max_width - mark - len(str(len(value))))
    kept = fitting(max_width - mark - len(str(len(value) - kept)))
    return "".join(pieces[:kept]) + f"{CUT}(+{len(value) - kept})"


def render_table(rows: Sequence[Sequence[str]], right: Collection[int] = (),
                 max_width: int | None | Sequence[int | None] = MAX_WIDTH) -> str:
    """Rows as columns two spaces apart (the first row is the header), every cell through
    `cell`. Columns whose index is in `right` are right-aligned (numbers), the others
    left-aligned; trailing blanks of a line are dropped. `max_width` caps every cell, or
    is one cap per column (None: no cap)."""
    if not rows:
        return ""
    if max_width is None or isinstance(max_width, int):
        caps = [max_width] * max(len(row) for row in rows)
    else:
        caps = list(max_width)
    shown = [[cell(v, cap) for v, cap in zip(row, caps)] for row in rows]
    widths = [[width(v) for v in row] for row in shown]
    columns = [max(col) for col in zip(*widths)]

    def line(row: list[str], ws: list[int]) -> str:
        cells = [" " * (c - w) + v if i in right else v + " " * (c - w)
                 for i, (v, w, c) in enumerate(zip(row, ws, columns))]
        return "  ".join(cells).rstrip(" ")

    return "\n".join(line(row, ws) for row, ws in zip(shown, widths))
