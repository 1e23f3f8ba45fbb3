"""keygate.tables: every value shown is escaped so it cannot act on a terminal, every table
cell is cut to a width with a visible mark, and columns stay aligned."""

from __future__ import annotations

import json
import sys
import time
import tomllib
import unicodedata
from pathlib import Path

import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "addons") not in sys.path:
    sys.path.insert(0, str(ROOT / "addons"))

from keygate.cli.tables import (  # noqa: E402
    CUT,
    MAX_WIDTH,
    cell,
    escape,
    escape_encoded,
    escape_surrogates,
    render_table,
    width,
)

C0 = [chr(c) for c in range(0x20)]
C1 = [chr(c) for c in range(0x80, 0xa0)]
BIDI = [chr(c) for c in [*range(0x202a, 0x202f), *range(0x2066, 0x206a), 0x200e, 0x200f, 0x61c]]
LINES = ["\u2028", "\u2029"]
SURROGATES = list(b"\x80\xff\xfe".decode("utf-8", "surrogateescape")) + ["\ud800", "\udbff"]
UNSAFE = C0 + ["\x7f"] + C1 + BIDI + LINES + SURROGATES


def safe(text: str) -> bool:
    """Nothing a terminal acts on: no control, format-direction, separator or surrogate."""
    return not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI
                   for c in text)


# --------------------------------------------------------------------------- escape


@pytest.mark.parametrize("ch", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_every_unsafe_character_becomes_a_visible_escape(ch):
    shown = escape(f"a{ch}b")
    assert shown.startswith("a\\") and shown.endswith("b") and shown.isascii()
    assert shown.isprintable() and safe(shown)
    assert cell(f"a{ch}b") == shown


@pytest.mark.parametrize("raw, shown", [
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    ("\x1b[2J", "\\x1b[2J"),
    ("x\nTOTAL", "x\\nTOTAL"),
    ("a\r\tb", "a\\r\\tb"),
    ("\x00\x7f", "\\x00\\x7f"),
    ("\x85\x9b", "\\x85\\x9b"),
    ("\u202egpt\u2066", "\\u202egpt\\u2066"),
    (b"m\xff".decode("utf-8", "surrogateescape"), "m\\udcff"),
])
def test_escapes_read_like_python(raw, shown):
    assert escape(raw) == shown


def test_printable_text_is_left_alone():
    for text in ("llama3.2:latest", "hf.co/org/Model-GGUF:Q4_K_M", "café", "模型", "Ωmega",
                 "emoji 🦙", "back\\slash", "a  b", "\u00a0nbsp"):
        assert escape(text) == text == cell(text)


def test_no_code_point_gets_through_unescaped():
    every = "".join(chr(c) for c in range(0x110000))
    assert safe(escape(every))
    assert escape(escape(every)) == escape(every)  # what it makes is left alone


# --------------------------------------------------------------------------- cut


def test_cell_is_cut_at_the_width_with_a_mark():
    assert cell("x" * MAX_WIDTH) == "x" * MAX_WIDTH
    cut = cell("x" * (MAX_WIDTH + 1))
    assert width(cut) == MAX_WIDTH and cut == "x" * 55 + f"{CUT}(+6)"
    assert cell("y" * 100, max_width=20) == "y" * 14 + f"{CUT}(+86)"
    assert width(cell("y" * 100, max_width=20)) == 20
    assert cell("z" * 500, max_width=None) == "z" * 500


def test_the_mark_counts_the_characters_left_out():
    for n in (61, 99, 100, 101, 1000, 12345):
        shown = cell("a" * n)
        kept, _, rest = shown.partition(CUT)
        assert int(rest.removeprefix("(+").removesuffix(")")) == n - len(kept)
        assert width(shown) == MAX_WIDTH


def test_cut_never_splits_an_escape():
    shown = cell("\x1b" * 100, max_width=30)
    kept, _, rest = shown.partition(CUT)
    assert kept == "\\x1b" * (len(kept) // 4) and len(kept) % 4 == 0
    assert rest == f"(+{100 - len(kept) // 4})"
    assert width(shown) <= 30


def test_escapes_count_towards_the_width():
    shown = cell("\n" * 40)  # 80 columns once escaped
    assert width(shown) <= MAX_WIDTH and shown.endswith(")") and CUT in shown


def test_wide_and_zero_width_characters():
    assert width("模型") == 4 and width("e\u0301") == 1
    shown = cell("模" * 100)
    assert CUT in shown and MAX_WIDTH - 1 <= width(shown) <= MAX_WIDTH
    zalgo = cell("a" + "\u0301" * 100_000)  # zero width each, but not free
    assert CUT in zalgo and len(zalgo) <= MAX_WIDTH


def test_a_megabyte_cell_is_cheap_and_bounded():
    for big in ("m" * 1_000_000, "\x1b[2J" * 250_000, "模" * 1_000_000):
        t0 = time.perf_counter()
        table = render_table([["model", "requests"], [big, "1"], ["llama3.2", "2"]], right={1})
        assert time.perf_counter() - t0 < 0.5
        assert len(table) < 400 and all(width(line) <= MAX_WIDTH + 12 for line in
                                         table.splitlines())
        assert f"{CUT}(+" in table and all(safe(line) for line in table.splitlines())


# --------------------------------------------------------------------------- tables


def test_alignment_is_measured_after_escaping():
    rows = [["NAME", "N"], ["a\tb", "1"], ["abcd", "22"], ["\x1b", "333"], ["模型", "4"]]
    lines = render_table(rows, right={1}).splitlines()
    assert lines == ["NAME    N", "a\\tb    1", "abcd   22", "\\x1b  333", "模型    4"]
    assert len({width(line) for line in lines}) == 1
    assert len(lines) == len(rows)  # no value made a line of its own


def test_left_aligned_columns_and_trailing_blanks():
    table = render_table([["NAME", "MODELS", "X"], ["alice", "llama3.2:*", ""],
                          ["b", "*", "-"]])
    assert table.splitlines() == [
        "NAME   MODELS      X",
        "alice  llama3.2:*",
        "b      *           -",
    ]


def test_a_forged_row_stays_in_its_cell():
    table = render_table([["model", "requests"], ["x\nTOTAL  999", "1"], ["TOTAL", "1"]],
                         right={1})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("x\\nTOTAL  999")


def test_caps_per_column():
    table = render_table([["a", "b", "c"], ["x" * 100, "y" * 100, "z" * 100]],
                         max_width=[10, None, 20])
    a, b, c = table.splitlines()[1].split("  ")
    assert width(a) == 10 and b == "y" * 100 and width(c) == 20
    assert render_table([]) == ""


# --------------------------------------------------------------------------- encoded output


def test_json_and_toml_write_unsafe_characters_as_escapes():
    value = "".join(UNSAFE) + "模型 café"
    text = escape_encoded(json.dumps({"model": value}, ensure_ascii=False))
    assert safe(text) and "模型 café" in text
    assert json.loads(text)["model"] == value

    toml_value = escape_surrogates(value)
    assert "\\udcff" in toml_value and all(unicodedata.category(c) != "Cs" for c in toml_value)
    text = escape_encoded(tomli_w.dumps({"model": toml_value}))
    assert safe(text.replace("\n", ""))
    assert tomllib.loads(text)["model"] == toml_value
