"""`keygate keys` (keygate.cli.keys, scripts/keys): keys.yaml edits keep the operator's file,
store only digests, refuse bad input without touching the file, and print a new key alone on
stdout."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "addons") not in sys.path:
    sys.path.insert(0, str(ROOT / "addons"))

from keygate.cli.common import note  # noqa: E402
from keygate.cli.main import main  # noqa: E402
from keygate.model.keyring import parse_keys  # noqa: E402

KEY_RE = re.compile(r"^sk-[A-Za-z0-9]{48}$")
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64
DIGEST_C = "c" * 64

# Every kind of comment ruamel attaches somewhere surprising: above the first entry, at
# the end of a nested mapping (really "above bob"), after a block sequence (really "above
# carol"), end-of-line ones, and a closing comment for the whole file.
COMMENTED = f"""\
# Lab keys. Hand-edited; scripts/keys must keep this.
keys:
  # alice: laptop
  alice:
    key_sha256: "{DIGEST_A}"  # rotated 2026-01
    models: ["llama3.2:*", "gpt-4o-mini"]
    limits:
      rpm: 60   # be gentle
      #   tpm: 5000
  # bob: CI runner
  bob:
    key_sha256: "{DIGEST_B}"
    # only the runner's network
    allow_ips:
      - 10.0.0.0/8
      - "::1"

  # carol: no comments inside
  carol:
    key_sha256: "{DIGEST_C}"
# end of keys
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nkeys_file = "keys.yaml"\nusage_log = "logs/usage.jsonl"\n')
    return cfg


@pytest.fixture
def keys_file(gateway: Path) -> Path:
    return gateway.parent / "keys.yaml"


def keys(*argv: str) -> int:
    """`keygate keys ...`, in this process: its exit status; output to capsys."""
    return main(["keys", *argv])


def run(gateway: Path, *argv: str) -> int:
    return keys("--config", str(gateway), *argv)


def comment_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def names(text: str, path: Path) -> list[str]:
    return list(parse_keys(text, path).by_name)


def add(gateway: Path, capsys, *argv: str) -> str:
    assert run(gateway, "add", *argv) == 0
    return capsys.readouterr().out.strip()


# --- add ---------------------------------------------------------------------------------------


def test_add_prints_only_the_key_and_stores_only_its_digest(gateway, keys_file, capsys):
    assert run(gateway, "add", "alice") == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and KEY_RE.match(out.rstrip("\n"))
    key = out.strip()
    assert "alice" in err and key not in err

    text = keys_file.read_text()
    assert key not in text and key[3:] not in text
    assert f'key_sha256: "{hashlib.sha256(key.encode()).hexdigest()}"' in text
    ring = parse_keys(text, keys_file)
    assert ring.lookup(key).name == "alice"
    assert text.startswith("# keygate API keys")  # a new file gets a short header
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


def test_add_creates_missing_folder_with_mode_0600(tmp_path, capsys):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nkeys_file = "secret/dir/keys.yaml"\n')
    key = add(cfg, capsys, "first")
    path = tmp_path / "secret" / "dir" / "keys.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert parse_keys(path.read_text(), path).lookup(key).name == "first"


def test_add_options_accumulate_and_validate(gateway, keys_file, capsys):
    key = add(
        gateway, capsys, "bob",
        "--models", "llama3.2:*,gpt-4o-mini", "--models", "qwen2.5:7b",
        "--scopes", "inference", "--scopes", "admin",
        "--allow-ips", "203.0.113.0/24,::1", "--allow-ips", "10.0.0.1",
        "--expires", "2027-01-01",
        "--rpm", "60", "--tpm", "1000", "--concurrent", "4", "--requests-per-day", "5000",
        "--tokens-per-day", "100000", "--tokens-total", "0", "--disabled",
    )
    k = parse_keys(keys_file.read_text(), keys_file).lookup(key)
    assert k.name == "bob" and not k.enabled
    assert k.models == ("llama3.2:*", "gpt-4o-mini", "qwen2.5:7b")
    assert k.scopes == {"inference", "admin"}
    assert [str(n) for n in k.allow_ips] == ["203.0.113.0/24", "::1/128", "10.0.0.1/32"]
    assert k.expires_at == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)
    assert (k.limits.rpm, k.limits.tpm, k.limits.concurrent) == (60, 1000, 4)
    daily = (k.limits.requests_per_day, k.limits.tokens_per_day, k.limits.tokens_total)
    assert daily == (5000, 100000, 0)


def test_add_datetime_expiry_is_stored_in_utc(gateway, keys_file, capsys):
    key = add(gateway, capsys, "temp", "--expires", "2030-06-01T12:30:00+02:00")
    k = parse_keys(keys_file.read_text(), keys_file).lookup(key)
    assert k.expires_at == dt.datetime(2030, 6, 1, 10, 30, tzinfo=dt.timezone.utc)


def test_add_appends_after_last_entry_keeping_everything(keys_file, gateway, capsys):
    keys_file.write_text(COMMENTED)
    key = add(gateway, capsys, "dave", "--rpm", "5")
    text = keys_file.read_text()
    assert names(text, keys_file) == ["alice", "bob", "carol", "dave"]
    # Every original line is still there, in order, untouched; the new entry sits after
    # carol (with a blank line, as the file separates its last entries) and above the
    # file's closing comment.
    head = COMMENTED[: COMMENTED.index("# end of keys")]
    assert text.startswith(head)
    assert text.endswith("rpm: 5\n# end of keys\n")
    assert "\n\n  dave:\n" in text
    assert parse_keys(text, keys_file).lookup(key).name == "dave"


def test_add_to_the_shipped_example_file(gateway, keys_file, capsys):
    example = (ROOT / "config" / "keys.example.yaml").read_text()
    keys_file.write_text(example)
    add(gateway, capsys, "alice")
    add(gateway, capsys, "bob")
    text = keys_file.read_text()
    assert names(text, keys_file) == ["alice", "bob"]
    assert comment_lines(text) == comment_lines(example)
    assert "keys: {}" not in text


# --- revoke / enable / rotate / remove ------------------------------------------------------------


def test_revoke_enable_rotate_remove_keep_comments_and_order(gateway, keys_file, capsys):
    keys_file.write_text(COMMENTED)
    os.chmod(keys_file, 0o640)

    assert run(gateway, "revoke", "bob") == 0
    assert capsys.readouterr().out == ""
    text = keys_file.read_text()
    assert comment_lines(text) == comment_lines(COMMENTED)
    assert names(text, keys_file) == ["alice", "bob", "carol"]
    assert not parse_keys(text, keys_file).by_name["bob"].enabled
    # enabled goes right after the secret, and the comment above allow_ips stays above it
    assert (f'"{DIGEST_B}"\n    enabled: false\n'
            "    # only the runner's network\n    allow_ips:") in text
    # nothing outside bob's entry changed
    assert text.replace("    enabled: false\n", "", 1) == COMMENTED

    assert run(gateway, "enable", "bob") == 0
    text = keys_file.read_text()
    assert parse_keys(text, keys_file).by_name["bob"].enabled
    assert text.replace("    enabled: true\n", "", 1) == COMMENTED

    assert run(gateway, "rotate", "alice") == 0
    key = capsys.readouterr().out.strip()
    assert KEY_RE.match(key)
    text = keys_file.read_text()
    assert comment_lines(text) == comment_lines(COMMENTED)
    assert DIGEST_A not in text and key not in text
    assert parse_keys(text, keys_file).lookup(key).name == "alice"
    assert f'"{hashlib.sha256(key.encode()).hexdigest()}"  # rotated 2026-01' in text

    assert run(gateway, "remove", "alice") == 0
    text = keys_file.read_text()
    assert names(text, keys_file) == ["bob", "carol"]
    # alice's own comment block and her commented-out limit went with her; the comment
    # above bob (which ruamel files under alice's last value) did not.
    assert text.startswith(
        "# Lab keys. Hand-edited; scripts/keys must keep this.\nkeys:\n  # bob: CI runner\n  bob:\n"
    )
    assert "alice" not in text and "tpm: 5000" not in text
    assert text.endswith(
        f'  # carol: no comments inside\n  carol:\n    key_sha256: "{DIGEST_C}"\n# end of keys\n'
    )
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o640


@pytest.mark.parametrize("name, expected", [
    # Removing the entry above another must leave that entry's comment in place.
    ("bob", f"""\
# Lab keys. Hand-edited; scripts/keys must keep this.
keys:
  # alice: laptop
  alice:
    key_sha256: "{DIGEST_A}"  # rotated 2026-01
    models: ["llama3.2:*", "gpt-4o-mini"]
    limits:
      rpm: 60   # be gentle
      #   tpm: 5000

  # carol: no comments inside
  carol:
    key_sha256: "{DIGEST_C}"
# end of keys
"""),
    ("carol", COMMENTED.replace(f"""
  # carol: no comments inside
  carol:
    key_sha256: "{DIGEST_C}"
""", "\n")),
])
def test_remove_keeps_the_next_entrys_comment(gateway, keys_file, name, expected):
    keys_file.write_text(COMMENTED)
    assert run(gateway, "remove", name) == 0
    assert keys_file.read_text() == expected


def test_revoking_a_revoked_key_leaves_the_file_alone(gateway, keys_file, capsys):
    keys_file.write_text(COMMENTED.replace('"{}"\n'.format(DIGEST_C),
                                           '"{}"\n    enabled: false\n'.format(DIGEST_C)))
    before = keys_file.read_bytes()
    assert run(gateway, "revoke", "carol") == 0
    assert "already revoked" in capsys.readouterr().err
    assert keys_file.read_bytes() == before
    assert run(gateway, "enable", "carol") == 0
    assert keys_file.read_text() == COMMENTED.replace(
        '"{}"\n'.format(DIGEST_C), '"{}"\n    enabled: true\n'.format(DIGEST_C))


def test_remove_every_key_leaves_a_valid_file(gateway, keys_file):
    keys_file.write_text(COMMENTED)
    for name in ("carol", "alice", "bob"):
        assert run(gateway, "remove", name) == 0
    text = keys_file.read_text()
    assert len(parse_keys(text, keys_file)) == 0
    assert text.startswith("# Lab keys.") and "# end of keys" in text


def test_rotate_keeps_name_and_changes_digest(gateway, keys_file, capsys):
    old = add(gateway, capsys, "alice", "--rpm", "7")
    before = parse_keys(keys_file.read_text(), keys_file).by_name["alice"]
    assert run(gateway, "rotate", "alice") == 0
    new = capsys.readouterr().out.strip()
    assert KEY_RE.match(new) and new != old
    ring = parse_keys(keys_file.read_text(), keys_file)
    after = ring.by_name["alice"]
    assert after.digest != before.digest and after.digest == hashlib.sha256(new.encode()).digest()
    assert ring.lookup(old) is None and ring.lookup(new).name == "alice"
    assert after.limits == before.limits


def test_rotate_replaces_a_plaintext_key_in_place(gateway, keys_file, capsys):
    keys_file.write_text(
        "keys:\n  demo:\n    key: \"sk-demo-plaintext-123\"  # demo only\n    enabled: true\n"
    )
    assert run(gateway, "rotate", "demo") == 0
    new = capsys.readouterr().out.strip()
    text = keys_file.read_text()
    assert "sk-demo-plaintext-123" not in text and "key:" not in text
    digest = hashlib.sha256(new.encode()).hexdigest()
    assert text.startswith(f'keys:\n  demo:\n    key_sha256: "{digest}"')
    assert "# demo only\n    enabled: true\n" in text


def test_edit_keeps_four_space_indentation_and_crlf(gateway, keys_file):
    original = ("keys:\r\n    alice:\r\n        key_sha256: \"" + DIGEST_A + "\"\r\n"
                "        allow_ips:\r\n            - 10.0.0.0/8\r\n"
                "    bob:\r\n        key_sha256: \"" + DIGEST_B + "\"\r\n")
    keys_file.write_bytes(original.encode())
    assert run(gateway, "revoke", "alice") == 0
    data = keys_file.read_bytes().decode()
    assert data == original.replace(
        DIGEST_A + "\"\r\n", DIGEST_A + "\"\r\n        enabled: false\r\n"
    )


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, code, message", [
    (["add", "alice"], 2, "already exists"),
    (["add", "dave", "--allow-ips", "10.0.0.300/8"], 2, "allow_ips"),
    (["add", "dave", "--expires", "2027-13-45"], 2, "--expires"),
    (["add", "dave", "--expires", "next tuesday"], 2, "--expires"),
    (["add", "dave", "--scopes", "inference,root"], 2, "unknown scope 'root'"),
    (["add", "bad name!"], 2, "key name"),
    (["revoke", "nobody"], 1, "no key named 'nobody'"),
    (["enable", "nobody"], 1, "no key named 'nobody'"),
    (["rotate", "nobody"], 1, "no key named 'nobody'"),
    (["remove", "nobody"], 1, "no key named 'nobody'"),
])
def test_refusals_leave_the_file_byte_identical(gateway, keys_file, capsys, argv, code, message):
    keys_file.write_text(COMMENTED)
    before = keys_file.read_bytes()
    assert run(gateway, *argv) == code
    out, err = capsys.readouterr()
    assert out == ""  # in particular no key
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert keys_file.read_bytes() == before
    assert sorted(p.name for p in keys_file.parent.iterdir()) == ["gateway.toml", "keys.yaml"]


def test_usage_errors_exit_2_without_traceback(gateway, keys_file, capsys):
    assert run(gateway, "add", "dave", "--rpm", "lots") == 2
    assert run(gateway, "add", "dave", "--rpm", "-1") == 2
    assert run(gateway, "add", "dave", "--models", ",") == 2
    assert run(gateway, "frobnicate") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not keys_file.exists()
    assert keys("--help") == 0


def test_a_broken_file_is_not_edited(gateway, keys_file, capsys):
    keys_file.write_text("keys:\n  alice:\n    key_sha256: nothex\n")
    before = keys_file.read_bytes()
    assert run(gateway, "add", "bob") == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{keys_file}:3:" in err and "nothing was changed" in err
    assert keys_file.read_bytes() == before


def test_a_broken_gateway_toml_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[gateway\n")
    assert keys("--config", str(cfg), "list") == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and err.count("\n") == 1


def test_unset_api_key_env_does_not_block_key_edits(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KEYGATE_TEST_UNSET_VAR", raising=False)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[[channels]]\nname = "up"\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                   'api_key_env = "KEYGATE_TEST_UNSET_VAR"\n')
    assert KEY_RE.match(add(cfg, capsys, "alice"))


# --- list -----------------------------------------------------------------------------------------


def _write_usage(gateway: Path, records: list[dict]) -> None:
    log = gateway.parent / "logs" / "usage.jsonl"
    log.parent.mkdir(exist_ok=True)
    log.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_list_shows_policy_and_today_never_a_secret(gateway, keys_file, capsys):
    a = add(gateway, capsys, "alice", "--models", "llama3.2:*", "--rpm", "60",
            "--expires", "2020-01-01")
    b = add(gateway, capsys, "bob", "--disabled", "--allow-ips", "10.0.0.0/8")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    _write_usage(gateway, [
        {"ts": now, "id": f"r{i}", "key": "alice", "status": 200, "error": None,
         "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        for i in range(3)
    ])
    digests = [hashlib.sha256(k.encode()).hexdigest() for k in (a, b)]

    assert run(gateway, "list") == 0
    table = capsys.readouterr().out
    assert run(gateway, "list", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    for shown in (table, json.dumps(rows)):
        assert a not in shown and b not in shown
        assert not any(d in shown or d[:16] in shown for d in digests)
    assert table.splitlines()[0].split()[:3] == ["NAME", "ENABLED", "EXPIRES"]
    assert [r["name"] for r in rows] == ["alice", "bob"]
    alice, bob = rows
    assert alice["models"] == ["llama3.2:*"] and alice["limits"] == {"rpm": 60}
    assert alice["expires_at"] == "2020-01-01" and alice["expired"] is True
    assert bob["enabled"] is False and bob["allow_ips"] == ["10.0.0.0/8"]
    assert bob["models"] is None and bob["scopes"] == ["inference", "models"]
    try:
        import keygate.accounting.ledger  # noqa: F401
    except ImportError:
        pytest.skip("keygate.ledger not available: usage columns are empty by design")
    assert (alice["requests_today"], alice["tokens_today"]) == (3, 21)
    assert (bob["requests_today"], bob["tokens_today"]) == (0, 0)


def test_list_works_without_the_ledger(gateway, capsys, monkeypatch):
    add(gateway, capsys, "alice")
    monkeypatch.setitem(sys.modules, "keygate.accounting.ledger", None)  # makes the import fail
    assert run(gateway, "list", "--format", "json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "alice" and row["requests_today"] is None
    assert run(gateway, "list") == 0
    assert "alice" in capsys.readouterr().out


def test_list_shows_odd_values_escaped_and_cut(gateway, keys_file, capsys):
    """A hand-edited file may hold anything YAML can spell; the table shows it as text."""
    keys_file.write_text(
        f'keys:\n  alice:\n    key_sha256: "{DIGEST_A}"\n'
        f'    models: ["\\e]0;pwned\\a", "x\\nTOTAL", "\\u202ey", "{"m" * 1000}"]\n'
        f'  {"k" * 128}:\n    key_sha256: "{DIGEST_B}"\n')
    assert run(gateway, "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.isprintable() for line in lines)
    assert "\\x1b]0;pwned\\x07,x\\nTOTAL,\\u202ey,mmm" in lines[1]
    assert re.search(r"m…\(\+\d+\)", lines[1])  # cut, marked
    assert lines[2].startswith("k" * 128 + "  ")  # a key name is never cut
    assert max(len(line) for line in lines) < 1000
    assert lines[0].index("ENABLED") == lines[1].index("yes") == lines[2].index("yes")


def test_notes_are_one_escaped_line(capsys):
    note("keys", "cannot read x\x1b[2J\nforged: line\x07")
    err = capsys.readouterr().err
    assert err == "keys: cannot read x\\x1b[2J\\nforged: line\\x07\n"


def test_list_without_keys(gateway, capsys):
    assert run(gateway, "list") == 0
    out, err = capsys.readouterr()
    assert out == "" and "no keys" in err


def test_keygate_config_env_is_the_default(gateway, keys_file, capsys, monkeypatch):
    monkeypatch.setenv("KEYGATE_CONFIG", str(gateway))
    assert keys("add", "envkey") == 0
    key = capsys.readouterr().out.strip()
    assert parse_keys(keys_file.read_text(), keys_file).lookup(key).name == "envkey"


# --- the real wrapper -----------------------------------------------------------------------------


def test_scripts_keys_wrapper(gateway, keys_file):
    env = {**os.environ, "KEYGATE_CONFIG": str(gateway)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(ROOT / "scripts" / "keys"), "add", "wrapped", "--rpm", "5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert KEY_RE.match(key) and done.stdout == key + "\n"
    assert parse_keys(keys_file.read_text(), keys_file).lookup(key).name == "wrapped"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    done = subprocess.run([str(ROOT / "scripts" / "keys"), "remove", "nobody"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no key named 'nobody'" in done.stderr
    assert "Traceback" not in done.stderr


# --- any sequence of edits ------------------------------------------------------------------------

NAMES = ["alice", "bob", "carol", "dave", "erin"]


def _commented_file(names_: list[str]) -> str:
    out = ["# header: keep me\n", "keys:\n"]
    for i, n in enumerate(names_):
        if i % 2:
            out.append("\n")
        out += [f"  # about {n}\n", f"  {n}:\n",
                f'    key_sha256: "{hashlib.sha256(n.encode()).hexdigest()}"  # eol {n}\n',
                "    limits:\n", "      rpm: 5\n", f"      #   deep note {n}\n"]
    return "".join(out + ["# footer: keep me\n"])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "revoke", "enable", "rotate", "remove"]),
                          st.sampled_from(NAMES)), max_size=6))
def test_any_sequence_of_edits_keeps_every_other_comment(ops):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "gateway.toml"
        cfg.write_text('[gateway]\nkeys_file = "keys.yaml"\n')
        path = Path(tmp) / "keys.yaml"
        path.write_text(_commented_file(NAMES[:3]))
        model = {n: True for n in NAMES[:3]}  # name -> has its "# about" comment
        for op, name in ops:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                rc = keys("--config", str(cfg), op, name)
            if op == "add":
                assert rc == (2 if name in model else 0)
                model.setdefault(name, False)
            else:
                assert rc == (0 if name in model else 1)
                if op == "remove" and name in model:
                    del model[name]
            text = path.read_text()
            assert names(text, path) == list(model)
            assert text.startswith("# header: keep me\nkeys:\n")
            assert "# footer: keep me\n" in text
            for n, commented in model.items():
                assert (f"  # about {n}\n  {n}:\n" in text) == commented
                assert (f"#   deep note {n}\n" in text) == commented
            for gone in set(NAMES) - set(model):
                assert f"about {gone}" not in text and f"note {gone}" not in text
