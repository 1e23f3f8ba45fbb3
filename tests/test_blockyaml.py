"""keygate/model/blockyaml.py against PyYAML: the fast reader returns exactly SafeLoader's
document (and the right line for every key), or None. Never a different document.

Run as a script for the benchmark: `python tests/test_blockyaml.py [N]`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from keygate.model import blockyaml  # noqa: E402
from keygate.model import keyring as keys  # noqa: E402
from keygate.model.blockyaml import Lined  # noqa: E402
from keygate.model.settings import ConfigError  # noqa: E402

LOADERS = [yaml.SafeLoader] + ([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEWER = settings(SETTINGS, max_examples=100)  # for the slower strategies


# --------------------------------------------------------------------------- the oracle


def strict(x):
    """x with every value tagged by its type: True == 1 and date == datetime must not pass."""
    if isinstance(x, dict):
        return ("map", [(strict(k), strict(v)) for k, v in x.items()])
    if isinstance(x, list):
        return ("seq", [strict(i) for i in x])
    return (type(x).__name__, x)


def pyyaml(text: str, loader=yaml.SafeLoader):
    """("ok", document) or ("error", exception): SafeLoader raises more than YAMLError
    (ValueError for 2027-02-30), and any of it means blockyaml must give up."""
    try:
        return "ok", yaml.load(text, Loader=loader)
    except Exception as e:  # noqa: BLE001
        return "error", e


_resolver = yaml.resolver.Resolver()


def is_str(word: str) -> bool:
    """Whether YAML reads the plain word as a string (`yes`, `1`, `2027-01-01` are not)."""
    return _resolver.resolve(yaml.ScalarNode, word, (True, False)) == "tag:yaml.org,2002:str"


def check_lines(doc, node: yaml.Node) -> None:
    """Every mapping is a Lined whose .lines give each key's line, as PyYAML's marks do."""
    if isinstance(doc, dict):
        assert type(doc) is Lined, type(doc)
        assert isinstance(node, yaml.MappingNode)
        assert list(doc.lines) == list(doc), (doc.lines, doc)
        assert len(node.value) == len(doc)
        for key, (knode, vnode) in zip(doc, node.value, strict=True):
            assert doc.lines[key] == knode.start_mark.line + 1, (key, doc.lines)
            check_lines(doc[key], vnode)
    elif isinstance(doc, list):
        assert type(doc) is list
        assert isinstance(node, yaml.SequenceNode)
        for item, inode in zip(doc, node.value, strict=True):
            check_lines(item, inode)


def agree(text: str):
    """Assert blockyaml.load(text) is None or SafeLoader's document; return it."""
    got = blockyaml.load(text)  # must not raise, whatever the text
    if got is None:
        return None
    for loader in LOADERS:
        status, want = pyyaml(text, loader)
        assert status == "ok", f"blockyaml read what {loader.__name__} rejects: {want!r}\n{text}"
        assert strict(got) == strict(want), f"{loader.__name__} differs\n{text}"
    check_lines(got, yaml.compose(text, Loader=yaml.SafeLoader))
    return got


# --------------------------------------------------------------------------- tokens

# Words YAML 1.1 reads as something else than a string, or that are indicators, or that
# are almost one of those.
TRICKY = [
    "yes", "no", "on", "off", "y", "n", "Yes", "NO", "On", "OFF", "True", "TRUE", "true",
    "false", "False", "null", "Null", "NULL", "~", "1e3", "1.5e3", "1.0", ".5", "-.5", "+1",
    "-1", "-0", "0", "00", "010", "08", "0x1f", "0o17", "0b101", "1_000", "12:30", "1:2:3",
    "-12:30", "190:20:30", ".inf", "-.inf", ".NaN", "2027-01-01", "2027-02-30", "2027-1-1",
    "0000-01-01", "2027-01-01T10:00:00", "2027-01-01t10:00:00Z", "60", "50000000",
    "1" * 5000, "a:b", "a:", "a::", ":a", "-", "--", "---", "...", "-a", "a-", "a#b", "#a",
    "a,b", "a[0]", "a]b", "a{b}", "[]", "{}", "[a]", "=", "<<", "<", "?a", "?", "!a", "!",
    "&a", "*a", "*", "%a", "@a", "`a", "|", ">", "|-", "a b", "a  b", '"x', "x'y", "'x",
    "x\"y", "\\", "a\\b", "llama3.2:*", "qwen2.5:7b", "203.0.113.0/24", "::1", "::",
    "inference", "models", "admin", "ünïcødé", "日本語", "\xa0", "\xa0x", "x\xa0", "x\u3000",
    "\u2003", "\ufeffx", "x\ufeff", "😀", "key", "keys", "enabled", "limits", "rpm",
    "a!b", "a&b", "a*b", "a|b", "a>b", "a%b", "a@b", "a`b", "a?b", "a=b", "a~b", ".", "/",
    "+", "_", "a.b", "a/b", "a+b", "a_b", "sk-abcdefgh12345678", "9f86d081884c7d65",
]
FIELDS = sorted(keys.KEY_FIELDS | set(keys.LIMIT_NAMES))
NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,12}", fullmatch=True)
CLEAN = st.from_regex(r"[a-z][a-z0-9._/:@*-]{0,10}", fullmatch=True)
WORD = st.text(alphabet="abcxyzAZ019_-.:/+@*?#'\" ,[]{}!&|>%`=~<\\\xa0é日😀", min_size=1,
               max_size=12)
TAME_INNER = st.text(alphabet="abcXY019 #:,'[]{}-_.é日😀", max_size=16)
WILD_INNER = st.text(alphabet="abcXY019 #:,'\"[]{}\\-_.é日😀\xa0\u3000\t", max_size=16)

# Every strategy below takes `tame`: tame documents hold what people write in keys.yaml
# (most of them are read, and compared in full); wild ones hold anything above. They are
# built once (functools.cache): hypothesis is much faster with the same strategy objects.


@functools.cache
def inner(tame: bool):
    return TAME_INNER if tame else st.one_of(TAME_INNER, WILD_INNER)


@functools.cache
def plain(tame: bool):
    if tame:
        return st.one_of(CLEAN, NAME, st.integers(-10, 10**12).map(str),
                         st.sampled_from(["true", "false", "2027-01-01", "::1", "1e3"]))
    return st.one_of(CLEAN, st.sampled_from(TRICKY), WORD)


@functools.cache
def double_quoted(tame: bool):
    return inner(tame).map(lambda s: '"' + s.replace('"', "") + '"' if tame else '"' + s + '"')


@functools.cache
@st.composite
def single_quoted(draw, tame: bool):
    text = draw(inner(tame))
    if tame or draw(st.booleans()):
        text = text.replace("'", "''")
    return "'" + text + "'"


@functools.cache
def scalar(tame: bool):
    return st.one_of(plain(tame), double_quoted(tame), single_quoted(tame))


@functools.cache
def key(tame: bool):
    if tame:
        return st.one_of(NAME.filter(is_str), st.sampled_from(FIELDS))
    return st.one_of(NAME, st.sampled_from(FIELDS), st.sampled_from(TRICKY[:60]),
                     double_quoted(False), single_quoted(False), WORD)


@functools.cache
@st.composite
def flow(draw, tame: bool):
    items = draw(st.lists(scalar(tame), max_size=4))
    sep = draw(st.sampled_from([", ", ",", " , ", ",  "]))
    pad = draw(st.sampled_from(["", " "]))
    tail = "" if tame or not items else draw(st.sampled_from(["", "", ",", " ,"]))
    return "[" + pad + sep.join(items) + tail + pad + "]"


@functools.cache
@st.composite
def comment(draw, tame: bool):
    if draw(st.integers(0, 3)):
        return ""
    lead = [" #", "  #", "   # ", " # "] + ([] if tame else ["#"])
    return draw(st.sampled_from(lead)) + draw(inner(tame))


# --------------------------------------------------------------------------- documents

# A tree to render: ("map", [(key, node, comment)]), ("seq", [token...]), or a token
# string (a scalar, a flow list, "{}" or "" for nothing).


@functools.cache
@st.composite
def limits_node(draw, tame: bool):
    names = draw(st.lists(st.one_of(st.sampled_from(keys.LIMIT_NAMES), key(tame)),
                          max_size=4, unique=tame))
    value = st.integers(-5, 10**9).map(str)
    if not tame:
        value = st.one_of(value, st.sampled_from(TRICKY[:40]), scalar(False))
    return ("map", [(k, draw(value), draw(comment(tame))) for k in names])


@functools.cache
@st.composite
def seq_node(draw, tame: bool):
    items = scalar(tame) if tame else st.one_of(scalar(False), flow(False))
    return ("seq", draw(st.lists(items, min_size=1, max_size=3)))


@functools.cache
@st.composite
def value_node(draw, field: str, tame: bool):
    digests = st.integers(0, 2**256 - 1).map(lambda n: f"{n:064x}")
    usual = {
        "key_sha256": st.one_of(digests.map(lambda h: f'"{h}"'), digests),
        "key": st.one_of(st.sampled_from(["sk-abcdefgh12345", '"sk-1234567890"',
                                          "'sk-it''s-12345'"]), scalar(tame)),
        "enabled": st.sampled_from(["true", "false", '"true"'] +
                                   ([] if tame else ["yes", "no", "on", "True"])),
        "expires_at": st.one_of(
            st.dates(dt.date(1990, 1, 1), dt.date(2100, 1, 1)).map(str),
            st.sampled_from(['"2027-01-01"', "'2027-01-01T12:00:00Z'"] + ([] if tame else [
                "2027-02-30", "2027-13-01", "2027-1-1", "2027-01-01T12:00:00Z",
                "2027-01-01 12:00"]))),
        "models": st.one_of(flow(tame), seq_node(tame)),
        "scopes": st.one_of(seq_node(tame), flow(tame)),
        "allow_ips": st.one_of(flow(tame), seq_node(tame)),
        "limits": limits_node(tame),
    }
    if field in usual and draw(st.integers(0, 9)) < 8:
        return draw(usual[field])
    return draw(st.one_of(scalar(tame), flow(tame), seq_node(tame), limits_node(tame),
                          st.sampled_from(["", "{}", "[]", "[ ]"])))


@functools.cache
@st.composite
def entry_node(draw, tame: bool):
    fields = draw(st.lists(st.one_of(st.sampled_from(sorted(keys.KEY_FIELDS)), key(tame)),
                           max_size=6, unique=True))
    if not fields and draw(st.booleans()):
        return draw(st.sampled_from(["", "{}", "x"]))
    return ("map", [(f, draw(value_node(f, tame)), draw(comment(tame))) for f in fields])


@functools.cache
@st.composite
def document(draw, tame: bool):
    names = draw(st.lists(key(tame), max_size=4, unique=tame))
    entries = ("map", [(n, draw(entry_node(tame)), draw(comment(tame))) for n in names])
    top = [("keys", entries, draw(comment(tame)))]
    if draw(st.integers(0, 4)) == 0:
        other = "x-defaults" if tame else draw(key(False))
        top.insert(draw(st.integers(0, 1)), (other, draw(value_node("x", tame)), ""))
    return ("map", top)


@st.composite
def rendered(draw, tree, tame: bool):
    """The tree as text: indent widths 1-4 per level, lists indented or not, comments on
    their own lines at any indent, blank lines, trailing spaces, and (when not tame) the
    odd line one column off."""
    widths = draw(st.lists(st.sampled_from([2, 2, 3, 4, 1]), min_size=5, max_size=5))
    seq_offset = draw(st.sampled_from([None, None, 0, 1]))  # None: the level's width
    lines: list[str] = []

    def render(node, indent: int, depth: int) -> None:
        if node[0] == "map":
            for k, value, note in node[1]:
                if isinstance(value, tuple):
                    lines.append(" " * indent + k + ":" + note)
                    width = widths[depth]
                    if value[0] == "seq" and seq_offset is not None:
                        width = seq_offset
                    render(value, indent + width, depth + 1)
                else:
                    lines.append(" " * indent + k + ":" + (" " + value if value else "") + note)
        else:
            for item in node[1]:
                lines.append(" " * indent + "- " + item)

    render(tree, 0, 0)
    out: list[str] = []
    for line in lines:
        roll = draw(st.integers(0, 60))
        if roll == 0:
            out.append("")
        elif roll == 1:
            out.append(" " * draw(st.integers(0, 8)) + "#" + draw(inner(tame)))
        elif roll == 2:
            out.append(" " * draw(st.integers(0, 3)))
        if roll == 3 and not tame:
            line = " " + line  # one column off
        elif roll == 4 and line.startswith(" ") and not tame:
            line = line[1:]
        elif roll in (5, 6, 7):
            line += " " * draw(st.integers(1, 3))
        out.append(line)
    text = "\n".join(out)
    return text + draw(st.sampled_from(["\n", "\n", "", "\n\n", "\n# end"]))


@st.composite
def keys_yaml(draw, tame: bool):
    return draw(rendered(draw(document(tame)), tame))


@SETTINGS
@given(keys_yaml(tame=False))
def test_generated_documents_agree_with_pyyaml(text):
    agree(text)


@SETTINGS
@given(keys_yaml(tame=True))
def test_generated_tame_documents_agree_with_pyyaml(text):
    agree(text)


@SETTINGS
@given(st.lists(st.one_of(
    st.text(alphabet=" -:#'\"[]{},ab1\n", max_size=12),
    st.sampled_from(["keys:", "  a:", "    - x", "  b: [1, 2]", "# c", "", "  - y", "a: b"]),
    st.text(max_size=6)), max_size=8).map("\n".join))
def test_arbitrary_text_never_raises_and_agrees(text):
    agree(text)


# --------------------------------------------------------------------------- scripts/keys


def canonical_entry(name: str, secret_hex: str, *, enabled: bool, expires: dt.date | None,
                    models: list[str], scopes: list[str], ips: list[str],
                    limits: dict[str, int], note: str = "", block_scopes: bool = True) -> str:
    """One entry as `scripts/keys add` writes it, which is `scopes: [inference, models]`;
    with block_scopes, scopes as a `- item` list as in the benchmark's example."""
    out = [f"  {name}:" + (f"  # {note}" if note else ""), f'    key_sha256: "{secret_hex}"']
    if not enabled:
        out.append("    enabled: false")
    if expires is not None:
        out.append(f"    expires_at: {expires.isoformat()}")
    if models:
        out.append("    models: [" + ", ".join(f'"{m}"' for m in models) + "]")
    if scopes and block_scopes:
        out.append("    scopes:")
        out += [f"      - {s}" for s in scopes]
    elif scopes:
        out.append("    scopes: [" + ", ".join(scopes) + "]")
    if ips:
        out.append("    allow_ips: [" + ", ".join(f'"{ip}"' for ip in ips) + "]")
    if limits:
        out.append("    limits:")
        out += [f"      {k}: {v}" for k, v in limits.items()]
    return "\n".join(out) + "\n"


def canonical_file(n: int) -> str:
    """The example of the brief, n times: the benchmark's file."""
    return "# comment\nkeys:\n" + "".join(
        canonical_entry(f"user{i}", hashlib.sha256(f"k{i}".encode()).hexdigest(),
                        enabled=False, expires=dt.date(2027, 1, 1),
                        models=["llama3.2:*", "qwen2.5:7b"], scopes=["inference", "models"],
                        ips=["203.0.113.0/24", "::1"],
                        limits={"rpm": 60, "tokens_total": 50000000}, note="who")
        for i in range(n))


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,20}", fullmatch=True).filter(is_str)
MODEL = st.from_regex(r"[a-z][a-z0-9.-]{0,10}(:[a-z0-9*.]{1,6})?", fullmatch=True)
IP = st.one_of(st.ip_addresses().map(str),
               st.ip_addresses(v=4).map(lambda a: f"{a}/24"))


@st.composite
def canonical_entries(draw, min_size=0):
    names = draw(st.lists(NAMES, min_size=min_size, max_size=4, unique=True))
    return [
        (name, canonical_entry(
            name, f"{draw(st.integers(0, 2**256 - 1)):064x}",
            enabled=draw(st.booleans()),
            expires=draw(st.none() | st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31))),
            models=draw(st.lists(MODEL, max_size=3)),
            scopes=draw(st.lists(st.sampled_from(keys.SCOPES), max_size=3, unique=True)),
            ips=draw(st.lists(IP, max_size=2)),
            limits=draw(st.dictionaries(st.sampled_from(keys.LIMIT_NAMES),
                                        st.integers(0, 10**12), max_size=3)),
            note=draw(st.sampled_from(["", "who", "it's #2: ok"])),
            block_scopes=draw(st.booleans())))
        for name in names
    ]


@FEWER
@given(canonical_entries())
def test_the_scripts_keys_format_takes_the_fast_path(entries):
    text = "# comment\nkeys:\n" + "".join(e for _, e in entries)
    if not entries:
        text = "keys:\n"  # {"keys": None}
    doc = agree(text)
    assert doc is not None, text
    assert list(doc["keys"] or {}) == [n for n, _ in entries]


def test_the_benchmark_file_takes_the_fast_path():
    text = canonical_file(50)
    doc = agree(text)
    assert doc is not None
    alice = doc["keys"]["user0"]
    assert alice == {
        "key_sha256": hashlib.sha256(b"k0").hexdigest(), "enabled": False,
        "expires_at": dt.date(2027, 1, 1), "models": ["llama3.2:*", "qwen2.5:7b"],
        "scopes": ["inference", "models"], "allow_ips": ["203.0.113.0/24", "::1"],
        "limits": {"rpm": 60, "tokens_total": 50000000},
    }
    assert doc["keys"].lines["user1"] == 15 and alice.lines["limits"] == 12
    assert alice["limits"].lines == {"rpm": 13, "tokens_total": 14}


# What `scripts/keys add alice --models 'llama3.2:*,qwen2.5:7b' --scopes inference,models
# --expires 2027-01-01 --allow-ips 203.0.113.0/24,::1 --rpm 60 --tokens-total 50000000
# --disabled` wrote, below the comment block of config/keys.example.yaml.
KEYTOOL_OUTPUT = """\
# keygate API keys.
#
#   alice:
#     key_sha256: "<hex sha256 of the whole key>"   # or  key: "sk-..." (plaintext, allowed)

keys:
  alice:
    key_sha256: "7663caaff7e2d3b052baf7cc29f528383e880223eff04e055fe9d9839bd6a462"
    enabled: false
    expires_at: 2027-01-01
    scopes: [inference, models]
    models: ["llama3.2:*", "qwen2.5:7b"]
    allow_ips: ["203.0.113.0/24", "::1"]
    limits:
      rpm: 60
      tokens_total: 50000000
"""


@pytest.mark.parametrize("path", ["config/keys.example.yaml", None])
def test_the_files_keygate_ships_and_writes_take_the_fast_path(path):
    text = (Path(__file__).resolve().parents[1] / path).read_text() if path else KEYTOOL_OUTPUT
    assert agree(text) is not None


def test_every_load_builds_a_fresh_document():
    """Lines are remembered between loads; the lists and mappings they hold must not be."""
    text = "a:\n  l: [1, 2]\n  m: {}\n  s:\n    - x\n"
    first = blockyaml.load(text)
    first["a"]["l"].append(3)
    first["a"]["m"]["k"] = 1
    first["a"]["s"].append("y")
    assert blockyaml.load(text) == {"a": {"l": [1, 2], "m": {}, "s": ["x"]}}


# --------------------------------------------------------------------------- edge cases

# Each must come back None or equal to PyYAML's document (`agree`); those marked None
# must be given up on, those marked FAST must be read.
FAST, NONE, EITHER = "fast", "none", "either"
EDGE_CASES = [
    # anchors, aliases, merges, tags, directives, documents
    (NONE, "x-d: &d\n  rpm: 1\nkeys:\n  a:\n    limits: *d\n"),
    (NONE, "x-d: &d {rpm: 1}\nkeys:\n  a:\n    <<: *d\n    key: abcdefghij\n"),
    (NONE, "a: *x\n"),
    (NONE, "a: &x 1\nb: *x\n"),
    (NONE, "a: !!str 1\n"),
    (NONE, "a: !custom x\n"),
    (NONE, "!!map\na: 1\n"),
    (NONE, "%YAML 1.1\n---\na: 1\n"),
    (NONE, "---\na: 1\n"),
    (NONE, "a: 1\n---\nb: 2\n"),
    (NONE, "a: 1\n...\n"),
    # block scalars
    (NONE, "a: |\n  text\n"),
    (NONE, "a: >\n  folded\n  text\n"),
    (NONE, "a: |-\n  x\n"),
    # whitespace and encodings
    (NONE, "a:\n\tb: 1\n"),
    (NONE, "a: 1\t\n"),
    (NONE, "a: 1\r\nb: 2\r\n"),
    (NONE, "a: 1\rb: 2\n"),
    (NONE, "\ufeffa: 1\n"),
    (NONE, "a: \"x\u2028y\"\nb: 1\n"),  # PyYAML counts \u2028 as a line break
    (NONE, "a: x\x85\nb: 1\n"),
    (NONE, "a: \"\x01\"\n"),
    (NONE, "a: 1\n\xa0\n"),  # not blank to YAML
    (NONE, "a: 1\n\u3000# c\n"),
    (EITHER, "a: x\xa0\n"),
    (EITHER, "\xa0a: 1\n"),
    (FAST, "a: 1   \nb:   \n  c: x  \n"),  # trailing spaces
    (FAST, "a: 1\n\n   \n# c\n  # c\nb: 2\n"),
    # duplicates, flow maps, key:value, keys with spaces
    (NONE, "a: 1\na: 2\n"),
    (NONE, "keys:\n  a:\n    rpm: 1\n    rpm: 2\n"),
    (NONE, "a: {b: 1}\n"),
    (NONE, "{a: 1}\n"),
    (FAST, "a: {}\n"),
    (NONE, "a:b\n"),
    (NONE, "a:b: c\n"),
    (NONE, "a: b:\n"),
    (NONE, "a: b: c\n"),
    (FAST, "a: b:c\n"),
    (NONE, "key with spaces: 1\n"),
    (FAST, '"key with spaces": 1\n'),
    (FAST, "'it''s': 1\n"),
    (NONE, '"a\\tb": 1\n'),
    (NONE, "a : 1\n"),
    (NONE, "k" * 1025 + ": 1\n"),  # PyYAML: could not find expected ':'
    (FAST, "k" * 1024 + ": 1\n"),
    (NONE, '"' + "k" * 1023 + '": 1\n'),
    # keys YAML reads as something else than a string
    (NONE, "yes: 1\n"), (NONE, "no: 1\n"), (NONE, "on: 1\n"), (NONE, "null: 1\n"),
    (NONE, "~: 1\n"), (NONE, "1: x\n"), (NONE, "2027-01-01: x\n"), (NONE, "true: x\n"),
    (NONE, "keys:\n  no:\n    key: abcdefghij\n"),
    (FAST, '"yes": 1\n'),
    (NONE, "<<: {a: 1}\n"),
    (NONE, "=: 1\n"),
    (NONE, "? a\n: 1\n"),
    # values
    (NONE, "a: -\n"), (NONE, "a: [ - ]\n"), (FAST, "a: [-a]\n"), (NONE, "a: [a?b]\n"),
    (NONE, "a: [a:b]\n"), (NONE, "a: [a,]\n"), (NONE, "a: [,a]\n"), (NONE, "a: [[a]]\n"),
    (NONE, "a: [a\n"), (NONE, "a: [a,\n  b]\n"), (FAST, 'a: ["a, b", \'c]\']\n'),
    (FAST, "a: []\n"), (FAST, "a: [ ]\n"), (FAST, 'a: ["x # y"]  # z\n'),
    (NONE, "a: x # c\n  more\n"), (NONE, "a: x\n  more\n"), (NONE, "a:\n  x\n"),
    (NONE, "a: 'x\n  y'\n"), (NONE, 'a: "x\n  y"\n'),
    (NONE, 'a: "x\\"y"\n'), (NONE, 'a: "x" y\n'), (NONE, "a: 'x' y\n"),
    (NONE, "a: \"x\"#c\n"), (NONE, "a: yes\n"), (NONE, "a: 1.5\n"), (NONE, "a: 0x1f\n"),
    (NONE, "a: 12:30\n"), (NONE, "a: 2027-02-30\n"), (NONE, "a: 2027-01-01 10:00\n"),
    (NONE, "a: " + "1" * 5000 + "\n"), (NONE, "a: ~\n"), (NONE, "a: null\n"),
    (FAST, "a: 1e3\n"), (FAST, "a: -.5\n"), (EITHER, "a: x#y\n"),
    (FAST, "a: 'it''s # not a comment'\n"), (FAST, "a: ''''\n"), (NONE, "a: '''\n"),
    (FAST, "a: -1\nb: -0\nc: 0\nd: 2027-12-31\ne: true\nf: false\n"),
    (FAST, "a: ünïcødé\nb: \"日本語\"\nc: '😀'\n"),
    (FAST, "a:\nb:   # nothing\nc: 1\n"),
    # lists
    (NONE, "a:\n  - b: 1\n"),  # a list item that is a mapping
    (NONE, "a:\n  - b:\n"),
    (NONE, "a:\n  - - x\n"), (NONE, "a:\n  - -\n"), (NONE, "a:\n  -\n"), (NONE, "a:\n  - # c\n"),
    (NONE, "a:\n- x\n"),  # PyYAML's indentless list: valid, left to it
    (NONE, "- a\n- b\n"), (FAST, "a:\n  - x  # c\n  -   y\n"), (FAST, "a:\n  - [1, 2]\n"),
    (NONE, "a:\n  - x\n    - y\n"), (NONE, "a:\n  - x\n b: 1\n"), (NONE, "a:\n  - x\n  b: 1\n"),
    (FAST, "a:\n  - x\nb: 1\n"), (FAST, "a:\n  -x: 1\n"),
    # odd indentation
    (NONE, "a:\n    b: 1\n  c: 2\n"), (NONE, "a: 1\n  b: 2\n"), (NONE, " a: 1\nb: 2\n"),
    (FAST, "a: 1\n"), (FAST, "a:\n   b:\n      c: 1\n   d: 2\ne: 3\n"),
    (NONE, "a:\n  b: 1\n   c: 2\n"),
    # empty documents
    (NONE, ""), (NONE, "# only a comment\n"), (NONE, "\n\n"), (FAST, "keys:\n"),
]


@pytest.mark.parametrize("expect,text", EDGE_CASES)
def test_edge_cases(expect, text):
    got = agree(text)
    if expect == NONE:
        assert got is None, f"read {text!r} as {got!r}; PyYAML: {pyyaml(text)}"
    elif expect == FAST:
        assert got is not None, f"gave up on {text!r}"


@example("")
@SETTINGS
@given(st.text(max_size=30))
def test_any_single_value_agrees(value):
    assume("\n" not in value)
    agree(f"a: {value}\n")
    agree(f"a:\n  - {value}\n")
    agree(f"a: [{value}]\n")
    agree(f"{value}: 1\n")


@pytest.mark.parametrize("word", TRICKY)
def test_tricky_words_everywhere(word):
    for text in (f"a: {word}\n", f"a: {word}  # c\n", f"a: [{word}]\n", f"a: [x, {word}]\n",
                 f"a:\n  - {word}\n", f"{word}: 1\n", f"a:\n  {word}:\n    b: 1\n"):
        agree(text)


# --------------------------------------------------------------------------- keys.py


def ring_or_error(text: str, cache: keys.EntryCache | None = None):
    try:
        ring = keys.parse_keys(text, "k", cache)
    except ConfigError as e:
        return "error", str(e)
    return "ok", list(ring.by_name.items())


EDITS = ["add", "change", "remove", "rename", "duplicate", "same secret", "break", "none"]


@FEWER
@given(canonical_entries(min_size=1), st.lists(st.tuples(st.sampled_from(EDITS), st.data()),
                                                 min_size=1, max_size=4))
def test_parse_keys_per_entry_cache_agrees_with_whole_file(entries, edits):
    cache = keys.EntryCache()
    entries = list(entries)
    for step in range(len(edits) + 1):
        text = "# keys\nkeys:\n" + "".join(e for _, e in entries)
        assert ring_or_error(text, cache) == ring_or_error(text), text
        if step == len(edits):
            break
        edit, data = edits[step]
        i = data.draw(st.integers(0, max(0, len(entries) - 1)))
        if edit == "add":
            entries += data.draw(canonical_entries(min_size=1))[:1]
        elif not entries:
            continue
        elif edit == "change":  # the same name, other settings
            name = entries[i][0]
            new, block = data.draw(canonical_entries(min_size=1))[0]
            entries[i] = name, block.replace(f"  {new}:", f"  {name}:", 1)
        elif edit == "remove":
            del entries[i]
        elif edit == "rename":
            name, block = entries[i]
            new = data.draw(NAMES)
            entries[i] = new, block.replace(f"  {name}:", f"  {new}:", 1)
        elif edit == "duplicate":
            entries.append(entries[i])  # same name (and secret) twice
        elif edit == "same secret":
            name, block = entries[i]
            new = data.draw(NAMES)
            entries.append((new, block.replace(f"  {name}:", f"  {new}:", 1)))
        elif edit == "break":
            name, block = entries[i]
            entries[i] = name, block + data.draw(st.sampled_from([
                "    limits:\n      rpm: -1\n", "    bogus: 1\n", "    enabled: yes\n",
                "    scopes: [root]\n", "    expires_at: soon\n", "    models: []\n",
                "  # trailing\n"]))


def test_parse_keys_duplicate_names_raise_the_same_either_way():
    entry = canonical_entry("alice", "ab" * 32, enabled=True, expires=None, models=[],
                            scopes=[], ips=[], limits={})
    other = canonical_entry("bob", "cd" * 32, enabled=True, expires=None, models=[],
                            scopes=[], ips=[], limits={})
    cache = keys.EntryCache()
    good = "keys:\n" + entry + other
    assert ring_or_error(good, cache) == ring_or_error(good)
    dup = "keys:\n" + entry + other + entry
    a, b = ring_or_error(dup, cache), ring_or_error(dup)
    assert a == b and a[0] == "error" and "duplicate" in a[1], (a, b)


# --------------------------------------------------------------------------- benchmark


def bench(n: int = 10_000, repeat: int = 5) -> None:
    """Best-of-`repeat` CPU seconds for a file of n entries like the brief's example."""
    text = canonical_file(n)
    warm = keys.EntryCache()
    keys.parse_keys(text, "k", warm)
    runs = {
        "blockyaml.load(text)": lambda: blockyaml.load(text),
        "yaml.load(text, CSafeLoader)": lambda: yaml.load(text, Loader=keys._Loader),
        "keys.parse_keys(text)": lambda: keys.parse_keys(text, "k"),
        "keys.parse_keys(text, EntryCache())":
            lambda: keys.parse_keys(text, "k", keys.EntryCache()),
        "keys.parse_keys(text, warm EntryCache)": lambda: keys.parse_keys(text, "k", warm),
    }
    assert blockyaml.load(text) is not None
    print(f"{n} entries, {text.count(chr(10))} lines; best of {repeat}, CPU seconds")
    for label, run in runs.items():
        times = []
        for _ in range(repeat):
            start = time.process_time()
            run()
            times.append(time.process_time() - start)
        print(f"  {label:40} {min(times):.3f}")


if __name__ == "__main__":
    bench(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
