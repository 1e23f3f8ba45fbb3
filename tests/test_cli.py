"""The `keygate` command (keygate.cli.main) through click.testing.CliRunner: one group whose
subcommands share --help, errors, exit statuses and shell completion; the console script
pyproject.toml installs; and `keygate serve`'s pieces short of running mitmdump."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from keygate.cli import serve
from keygate.cli.main import cli, main
from keygate.model.keyring import parse_keys

ROOT = Path(__file__).resolve().parents[1]
KEY_RE = re.compile(r"^sk-[A-Za-z0-9]{48}$")


@pytest.fixture
def gateway(tmp_path: Path) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nkeys_file = "keys.yaml"\nusage_log = "logs/usage.jsonl"\n')
    return cfg


def invoke(*argv: str, **kwargs):
    return CliRunner().invoke(cli, list(argv), prog_name="keygate", **kwargs)


# --- one command --------------------------------------------------------------------------------


def test_the_console_script_is_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"keygate": "keygate.cli.main:main"}
    assert main(["--help"]) == 0  # returns its status: the console script sys.exit()s it


def test_help_lists_every_subcommand():
    done = invoke("--help")
    assert done.exit_code == 0
    for name in ("keys", "channels", "usage", "serve"):
        assert re.search(rf"^  {name} ", done.stdout, re.M)
    assert "_KEYGATE_COMPLETE" in done.stdout


@pytest.mark.parametrize("argv", [
    ["keys", "-h"], ["keys", "add", "--help"], ["keys", "list", "-h"], ["keys", "rotate", "-h"],
    ["channels", "--help"], ["channels", "add", "-h"], ["channels", "test", "--help"],
    ["usage", "--help"], ["serve", "-h"],
])
def test_every_help_is_on_stdout_with_status_0(argv):
    done = invoke(*argv)
    assert done.exit_code == 0 and done.stderr == ""
    assert done.stdout.startswith(f"Usage: keygate {' '.join(a for a in argv[:2] if a[0] != '-')}")


@pytest.mark.parametrize("argv, prog, message", [
    (["usage", "--frobnicate"], "usage", "unrecognized arguments: --frobnicate"),
    (["keys", "list", "extra"], "keys", "unrecognized arguments: extra"),
    (["keys", "add"], "keys", "Missing argument 'NAME'"),
    (["keys", "add", "x", "--rpm", "lots"], "keys", "'lots' is not a whole number"),
    (["keys", "add", "x", "--rpm", "-1"], "keys", "'-1' must be >= 0"),
    (["keys", "add", "x", "--models", ","], "keys", "needs at least one value"),
    (["keys", "list", "--format", "xml"], "keys", "invalid choice: 'xml'"),
    (["channels", "add", "x", "--base-url", "http://x"], "channels", "Missing option '--kind'"),
    (["channels", "add", "x", "--kind", "vllm", "--base-url", "http://x"], "channels",
     "invalid choice: 'vllm' (choose from 'ollama', 'openai')"),
    (["channels", "frobnicate"], "channels", "No such command 'frobnicate'"),
    (["serve", "--bogus"], "serve", "unrecognized arguments: --bogus"),
    (["serve", "extra"], "serve", "unrecognized arguments: extra"),
    (["keys"], "keys", "Missing command"),
    ([], "keygate", "Missing command"),
])
def test_usage_errors_are_the_usage_line_and_one_error_line(gateway, argv, prog, message):
    done = invoke(*argv, env={"KEYGATE_CONFIG": str(gateway)})
    assert done.exit_code == 2 and done.stdout == ""
    usage_line, error_line = done.stderr.splitlines()
    assert usage_line.startswith("Usage: keygate")
    assert error_line.startswith(f"{prog}: error: ") and message in error_line
    assert not (gateway.parent / "keys.yaml").exists()


def test_user_errors_are_one_line_with_their_status(gateway):
    done = invoke("keys", "--config", str(gateway), "remove", "nobody")
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr == f"keys: no key named 'nobody' in {gateway.parent / 'keys.yaml'}\n"
    done = invoke("channels", "--config", str(gateway), "add", "bad name", "--kind", "ollama",
                  "--base-url", "http://127.0.0.1:1")
    assert done.exit_code == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("channels: not changed: ")


def test_keys_add_prints_the_key_alone_on_stdout(gateway):
    done = invoke("keys", "add", "alice", "--rpm", "5", "--config", str(gateway))
    assert done.exit_code == 0, done.stderr
    key = done.stdout.strip()
    assert KEY_RE.match(key) and done.stdout == key + "\n" and key not in done.stderr
    path = gateway.parent / "keys.yaml"
    assert hashlib.sha256(key.encode()).hexdigest() in path.read_text()
    assert parse_keys(path.read_text(), path).lookup(key).limits.rpm == 5


def test_config_before_and_after_the_subcommand(tmp_path, gateway):
    other = tmp_path / "other" / "gateway.toml"
    other.parent.mkdir()
    other.write_text('[gateway]\nkeys_file = "keys.yaml"\n')
    assert invoke("keys", "--config", str(gateway), "add", "a").exit_code == 0
    assert invoke("keys", "add", "b", "--config", str(gateway)).exit_code == 0
    # given twice, the subcommand's own wins
    assert invoke("keys", "--config", str(gateway), "add", "c", "--config", str(other)
                  ).exit_code == 0
    path = gateway.parent / "keys.yaml"
    assert list(parse_keys(path.read_text(), path).by_name) == ["a", "b"]
    done = invoke("keys", "list", "--format", "json", env={"KEYGATE_CONFIG": str(other)})
    assert [r["name"] for r in json.loads(done.stdout)] == ["c"]


def test_usage_totals(tmp_path):
    log = tmp_path / "usage.jsonl"
    log.write_text("".join(json.dumps({
        "ts": f"2026-11-2{d}T10:00:00.000Z", "key": "alice", "model": "m", "error": None,
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}) + "\n" for d in (5, 6)))
    done = invoke("usage", "--log", str(log), "--since", "2026-11-26", "--format", "json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout) == [{"requests": 1, "prompt_tokens": 1, "completion_tokens": 2,
                                        "total_tokens": 3, "errors": 0, "cost": None}]
    done = invoke("usage", "--log", str(log), "--since", "2026-11-27", "--until", "2026-11-26")
    assert done.exit_code == 2 and "usage: error: --since is after --until" in done.stderr


def test_usage_reads_a_config_whose_channel_credential_is_not_in_this_shell(tmp_path,
                                                                           monkeypatch):
    """The upstream credentials live in the gateway's environment, not the operator's:
    `keygate usage --config` refused to run because a channel's api_key_env was unset."""
    monkeypatch.delenv("KG_TEST_UNSET_CREDENTIAL", raising=False)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nusage_log = "logs/usage.jsonl"\n\n[[channels]]\nname = "ds"\n'
                   'kind = "openai"\nbase_url = "https://api.example.com/v1"\n'
                   'api_key_env = "KG_TEST_UNSET_CREDENTIAL"\n')
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "usage.jsonl").write_text(json.dumps({
        "ts": "2026-11-25T10:00:00.000Z", "key": "alice", "model": "m", "error": None,
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}) + "\n")
    done = invoke("usage", "--config", str(cfg), "--format", "json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)[0]["total_tokens"] == 3
    # A config that does not validate is still refused, with its line.
    cfg.write_text("[gateway]\nbogus = 1\n")
    done = invoke("usage", "--config", str(cfg))
    assert done.exit_code == 2 and f"{cfg}:2: unknown setting" in done.stderr


# --- shell completion -----------------------------------------------------------------------------


def test_completion_script():
    done = invoke(env={"_KEYGATE_COMPLETE": "bash_source"})
    assert done.exit_code == 0 and "_KEYGATE_COMPLETE=bash_complete" in done.stdout


def complete(words: str, **env: str) -> list[str]:
    done = invoke(env={"_KEYGATE_COMPLETE": "bash_complete", "COMP_WORDS": words,
                       "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
                       **env})
    assert done.exit_code == 0, done.output
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if line]


def test_completion_of_subcommands_options_and_names(gateway):
    assert complete("keygate ") == ["keys", "channels", "usage", "serve"]
    assert complete("keygate keys re") == ["revoke", "remove"]
    assert "--format" in complete("keygate usage --f")
    assert complete("keygate usage --format ") == ["table", "json", "toml"]
    for name in ("alice", "albert", "bob"):
        assert invoke("keys", "--config", str(gateway), "add", name).exit_code == 0
    assert complete("keygate keys revoke al", KEYGATE_CONFIG=str(gateway)) == ["alice", "albert"]
    assert complete(f"keygate keys --config {gateway} rotate ") == ["alice", "albert", "bob"]
    gateway.write_text(gateway.read_text() + '[[channels]]\nname = "local"\nkind = "ollama"\n'
                       'base_url = "http://127.0.0.1:11434"\n')
    assert complete(f"keygate channels test --config {gateway} ") == ["local"]
    nowhere = gateway.parent / "elsewhere" / "gateway.toml"
    assert complete("keygate keys revoke ", KEYGATE_CONFIG=str(nowhere)) == []


# --- serve, short of mitmdump --------------------------------------------------------------------


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:3000", ("127.0.0.1", 3000)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:3000", ("::1", 3000)),
    ("localhost:0", ("localhost", 0)),
])
def test_listen(listen, expected):
    assert serve.split_listen(listen) == expected


@pytest.mark.parametrize("listen", ["3000", ":3000", "host:", "host:http", "host:70000"])
def test_listen_refused(listen):
    done = invoke("serve", "--listen", listen)
    assert done.exit_code == 2
    assert done.stderr == f"serve: --listen takes HOST:PORT, not {listen}\n"


def test_gateway_script_is_the_one_beside_the_package():
    assert serve.gateway_script() == ROOT / "addons" / "gateway.py"


def test_first_run_writes_the_keys_file_and_a_first_key(tmp_path, capsys):
    config = tmp_path / "gateway.toml"  # not the default: left missing, all defaults
    keys_file = serve.first_run(config)
    assert keys_file == tmp_path / "keys.yaml" and not config.exists()
    example = (ROOT / "config" / "keys.example.yaml").read_text()
    assert keys_file.read_text() == example
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    serve.first_key(config, keys_file, "127.0.0.1:3000")
    out, err = capsys.readouterr()
    key = re.search(r"^\s+(sk-\S+)\s*$", err, re.M).group(1)
    assert out == "" and KEY_RE.match(key)
    assert f'curl -H "Authorization: Bearer {key}" http://127.0.0.1:3000/v1/models' in err
    assert parse_keys(keys_file.read_text(), keys_file).lookup(key).name == "first-key"
    assert keys_file.read_text().startswith(example.split("keys: {}")[0])  # comments kept

    serve.first_key(config, keys_file, "127.0.0.1:3000")  # it has a key now: nothing to do
    assert capsys.readouterr() == ("", "")


def test_first_run_needs_the_config_folder(tmp_path):
    done = invoke("serve", "--config", str(tmp_path / "missing" / "gateway.toml"))
    assert done.exit_code == 2
    assert done.stderr == f"serve: the folder of {tmp_path / 'missing' / 'gateway.toml'} " \
                          "does not exist\n"


def test_serve_runs_mitmdump_with_keygates_settings(tmp_path, monkeypatch):
    import mitmproxy.tools.main

    seen: list[list[str]] = []
    monkeypatch.setattr(mitmproxy.tools.main, "mitmdump", seen.append)
    monkeypatch.setattr(serve, "CHECKOUT", tmp_path)  # where mitmproxy's confdir goes
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nkeys_file = "keys.yaml"\n')
    done = invoke("serve", "--config", str(config), "--listen", "[::1]:3456",
                  "--upstream", "http://10.0.0.2:11434", "--", "--set", "flow_detail=0", "extra")
    assert done.exit_code == 0, done.stderr
    assert "had no keys, so it now has one" in done.stderr
    (args,) = seen
    confdir = tmp_path / ".keygate" / "mitmproxy"
    assert confdir.is_dir()
    assert args == [
        "--mode", "reverse:http://10.0.0.2:11434", "--listen-host", "::1", "--listen-port", "3456",
        "-s", str(ROOT / "addons" / "gateway.py"),
        "--set", f"keygate_config={config.resolve()}", "--set", f"confdir={confdir}",
        "--set", "block_global=false", "--set", "connection_strategy=lazy",
        "--set", "flow_detail=0", "extra",
    ]


def test_python_dash_m(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "keygate.cli.main", "keys", "--config",
                           str(tmp_path / "gateway.toml"), "list"], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(ROOT / "addons")})
    assert done.returncode == 0 and "no keys" in done.stderr
