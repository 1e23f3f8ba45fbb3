"""`keygate channels` (keygate.cli.channels, scripts/channels): gateway.toml channel edits keep
every other setting and every comment, are validated like the gateway reads them, and `test`
reports status and latency."""

from __future__ import annotations

import json
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "addons") not in sys.path:
    sys.path.insert(0, str(ROOT / "addons"))

from keygate.cli import channels as chantool  # noqa: E402
from keygate.cli.main import main  # noqa: E402
from keygate.model.settings import parse_settings  # noqa: E402

GATEWAY = """\
# operator's notes: these stay when a channel is added or removed
[gateway]
keys_file = "my-keys.yaml"
usage_log = "logs/usage.jsonl"  # a comment
usage_log_max_mb = 2.5
usage_log_keep = 3
max_body_mb = 8
upstream_timeout_s = 90
trusted_proxies = ["10.0.0.0/8"]
cors_origins = ["https://chat.example.com"]

[[channels]]
name = "first"
kind = "ollama"
base_url = "http://127.0.0.1:11434"
models = ["llama3.2:*"]
priority = 5
"""


def channels(*argv: str) -> int:
    """`keygate channels ...`, in this process: its exit status; output to capsys."""
    return main(["channels", *argv])


def run(cfg: Path, *argv: str) -> int:
    return channels("--config", str(cfg), *argv)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY)
    return path


# --- add / list / remove -------------------------------------------------------------------------


def test_add_list_remove_round_trip_keeps_gateway_settings(cfg, capsys, monkeypatch):
    monkeypatch.setenv("KEYGATE_TEST_DS_KEY", "sk-upstream-secret")
    gateway_before = tomllib.loads(GATEWAY)["gateway"]

    assert run(cfg, "add", "ds", "--kind", "openai", "--base-url", "https://api.deepseek.com/v1",
               "--models", "deepseek-*", "--api-key-env", "KEYGATE_TEST_DS_KEY",
               "--priority", "1", "--weight", "2.5", "--no-stream-usage") == 0
    assert "comments" not in capsys.readouterr().err  # nothing to warn about: none dropped
    assert run(cfg, "add", "alias", "--kind", "ollama", "--base-url", "http://127.0.0.1:11435",
               "--models", "qwen2.5:7b,llama3.2:1b", "--map", "gpt-4o-mini=qwen2.5:7b",
               "--map", "gpt-4o=llama3.2:1b,o1=qwen2.5:7b") == 0
    text = cfg.read_text()
    assert text.startswith(GATEWAY)  # every line as it was, the new channels after them
    assert "# operator's notes" in text and "# a comment" in text

    doc = tomllib.loads(cfg.read_text())
    assert doc["gateway"] == gateway_before
    assert [c["name"] for c in doc["channels"]] == ["first", "ds", "alias"]
    assert doc["channels"][0] == tomllib.loads(GATEWAY)["channels"][0]
    assert doc["channels"][1] == {
        "name": "ds", "kind": "openai", "base_url": "https://api.deepseek.com/v1",
        "models": ["deepseek-*"], "priority": 1, "weight": 2.5,
        "api_key_env": "KEYGATE_TEST_DS_KEY", "stream_usage": False,
    }
    assert doc["channels"][2]["model_map"] == {
        "gpt-4o-mini": "qwen2.5:7b", "gpt-4o": "llama3.2:1b", "o1": "qwen2.5:7b",
    }
    settings = parse_settings(cfg.read_text(), cfg)  # what the gateway will read
    assert [c.name for c in settings.channels] == ["first", "ds", "alias"]

    assert run(cfg, "list") == 0
    table = capsys.readouterr().out
    assert "sk-upstream-secret" not in table
    assert [line.split()[0] for line in table.splitlines()] == ["NAME", "first", "ds", "alias"]
    assert run(cfg, "list", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["api_key_env"] == "KEYGATE_TEST_DS_KEY" and rows[1]["api_key_set_here"] is True
    assert "sk-upstream-secret" not in json.dumps(rows)

    assert run(cfg, "remove", "ds") == 0
    doc = tomllib.loads(cfg.read_text())
    assert doc["gateway"] == gateway_before
    assert [c["name"] for c in doc["channels"]] == ["first", "alias"]

    assert run(cfg, "remove", "first") == 0
    assert run(cfg, "remove", "alias") == 0
    doc = tomllib.loads(cfg.read_text())
    assert doc == {"gateway": gateway_before}  # no empty channels array left behind
    assert cfg.read_text() == GATEWAY[:GATEWAY.index("[[channels]]")].rstrip("\n") + "\n"


def test_add_creates_a_missing_file(tmp_path, capsys):
    cfg = tmp_path / "conf" / "gateway.toml"
    assert run(cfg, "add", "local", "--kind", "ollama", "--base-url", "http://127.0.0.1:11434") == 0
    assert tomllib.loads(cfg.read_text()) == {
        "channels": [{"name": "local", "kind": "ollama", "base_url": "http://127.0.0.1:11434"}]
    }
    assert "comments" not in capsys.readouterr().err


def test_unset_api_key_env_only_warns(cfg, capsys, monkeypatch):
    monkeypatch.delenv("KEYGATE_TEST_UNSET", raising=False)
    assert run(cfg, "add", "cloud", "--kind", "openai", "--base-url", "https://example.com/v1",
               "--api-key-env", "KEYGATE_TEST_UNSET") == 0
    assert "KEYGATE_TEST_UNSET is not set" in capsys.readouterr().err
    # ... and later edits are not blocked by it either
    assert run(cfg, "add", "other", "--kind", "ollama", "--base-url", "http://127.0.0.1:1") == 0
    assert run(cfg, "list") == 0
    assert "(unset here)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["add", "first", "--kind", "ollama", "--base-url", "http://x"], 2, "already exists"),
    (["add", "bad", "--kind", "openai", "--base-url", "ftp://example.com"], 2, "base_url"),
    (["add", "bad", "--kind", "openai", "--base-url", "http://u:p@example.com/v1"], 2,
     "credentials"),
    (["add", "bad name", "--kind", "ollama", "--base-url", "http://x"], 2, "name"),
    (["add", "bad", "--kind", "ollama", "--base-url", "http://x", "--map", "nope"], 2,
     "ALIAS=UPSTREAM"),
    (["add", "bad", "--kind", "ollama", "--base-url", "http://x", "--weight", "0"], 2, "weight"),
    (["remove", "nobody"], 1, "no channel named 'nobody'"),
    (["test", "nobody"], 1, "no channel named 'nobody'"),
])
def test_refusals_leave_the_file_byte_identical(cfg, capsys, argv, code, message):
    before = cfg.read_bytes()
    assert run(cfg, *argv) == code
    out, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert cfg.read_bytes() == before
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["gateway.toml"]


def test_usage_errors(cfg, capsys):
    assert run(cfg, "add", "x", "--base-url", "http://x") == 2  # --kind missing
    assert run(cfg, "add", "x", "--kind", "vllm", "--base-url", "http://x") == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cfg.read_text() == GATEWAY
    assert channels("--help") == 0
    assert "comments" in capsys.readouterr().out  # --help says they are kept


def test_list_without_channels(tmp_path, capsys):
    assert run(tmp_path / "missing.toml", "list") == 0
    out, err = capsys.readouterr()
    assert out == "" and "no channels" in err


# --- comments survive every edit -----------------------------------------------------------------


def comment_lines(text: str) -> list[str]:
    """Every line with a comment, end-of-line comments included (none of these files has a
    '#' inside a string)."""
    return [line for line in text.splitlines() if "#" in line]


def settings_order(text: str) -> list[str]:
    """Table headers and setting names, in file order."""
    return [line.split("=")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_add_then_remove_keeps_the_shipped_example(tmp_path, capsys):
    example = (ROOT / "config" / "gateway.example.toml").read_text()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(example)

    assert run(cfg, "add", "local", "--kind", "ollama", "--base-url", "http://127.0.0.1:11434",
               "--models", "llama3.2:*,qwen2.5:7b", "--map", "gpt-4o-mini=qwen2.5:7b") == 0
    assert run(cfg, "add", "deepseek", "--kind", "openai", "--base-url",
               "https://api.deepseek.com/v1", "--models", "deepseek-*", "--priority", "1") == 0
    added = cfg.read_text()
    assert added.startswith(example)  # every line as it was; the channels come after them
    assert comment_lines(added) == comment_lines(example)
    assert settings_order(added)[:len(settings_order(example))] == settings_order(example)
    settings = parse_settings(added, cfg)  # keygate's own parser
    assert [c.name for c in settings.channels] == ["local", "deepseek"]
    assert settings.channels[0].model_map == {"gpt-4o-mini": "qwen2.5:7b"}

    assert run(cfg, "remove", "local") == 0
    left = cfg.read_text()
    assert comment_lines(left) == comment_lines(example)
    assert settings_order(left)[:len(settings_order(example))] == settings_order(example)
    assert [c.name for c in parse_settings(left, cfg).channels] == ["deepseek"]

    assert run(cfg, "remove", "deepseek") == 0
    removed = cfg.read_text()
    assert comment_lines(removed) == comment_lines(example)
    assert settings_order(removed) == settings_order(example)
    assert parse_settings(removed, cfg) == parse_settings(example, cfg)
    assert removed == example  # and in fact byte for byte
    assert "comments" not in capsys.readouterr().err


COMMENTED = """\
# head
[gateway]
usage_log = "logs/usage.jsonl"

# Channels, most preferred first.
[[channels]]
name = "a"
kind = "ollama"   # the GPU box
base_url = "http://127.0.0.1:11434"
# models = ["llama3.2:*"]   (all of them, for now)

[[channels]]
name = "b"
kind = "openai"
base_url = "https://api.example.com/v1"
[channels.model_map]
"gpt-4o-mini" = "m"

# [[channels]]          a third, some day
# name = "c"
"""


@pytest.mark.parametrize("name, expected", [
    # A channel takes its header, its settings, the comments among them and those right
    # under its last setting; comments a blank line sets apart stay, wherever they were.
    ("a", COMMENTED.replace("""[[channels]]
name = "a"
kind = "ollama"   # the GPU box
base_url = "http://127.0.0.1:11434"
# models = ["llama3.2:*"]   (all of them, for now)

""", "")),
    ("b", COMMENTED.replace("""[[channels]]
name = "b"
kind = "openai"
base_url = "https://api.example.com/v1"
[channels.model_map]
"gpt-4o-mini" = "m"

""", "")),
])
def test_remove_takes_only_the_channels_own_lines(tmp_path, name, expected):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(COMMENTED)
    assert run(cfg, "remove", name) == 0
    assert cfg.read_text() == expected


def test_add_goes_after_the_comments_that_follow_the_last_channel(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(COMMENTED)
    assert run(cfg, "add", "c", "--kind", "ollama", "--base-url", "http://127.0.0.1:11435") == 0
    assert cfg.read_text() == COMMENTED + (
        '\n[[channels]]\nname = "c"\nkind = "ollama"\nbase_url = "http://127.0.0.1:11435"\n')
    for name in ("a", "b", "c"):
        assert run(cfg, "remove", name) == 0
    text = cfg.read_text()
    assert comment_lines(text) == [
        "# head", "# Channels, most preferred first.", "# [[channels]]          a third, some day",
        '# name = "c"']
    assert parse_settings(text, cfg).channels == ()


def test_crlf_file_keeps_its_line_breaks(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_bytes(b'[gateway]\r\nusage_log = "u.jsonl"  # crlf\r\n')
    assert run(cfg, "add", "b", "--kind", "ollama", "--base-url", "http://127.0.0.1:1") == 0
    data = cfg.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n") > 3
    assert run(cfg, "remove", "b") == 0
    assert cfg.read_bytes() == b'[gateway]\r\nusage_log = "u.jsonl"  # crlf\r\n'


# --- test -----------------------------------------------------------------------------------------


class Upstream:
    """A tiny Ollama / OpenAI look-alike on 127.0.0.1 that records what it was sent."""

    def __init__(self, chat_status: int = 200,
                 tags: tuple[str, ...] = ("llama3.2:1b", "qwen2.5:7b", "nomic-embed")):
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                upstream.requests.append(("GET", self.path, dict(self.headers), None))
                if self.path == "/api/tags":
                    self._reply(200, {"models": [{"name": n, "model": n} for n in tags]})
                elif self.path == "/v1/models":
                    self._reply(200, {"object": "list",
                                      "data": [{"id": "other"}, {"id": "deepseek-chat"}]})
                elif self.path == "/redirect/api/tags":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.2:9/steal")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.requests.append(("POST", self.path, dict(self.headers), body))
                if upstream.chat_status != 200:
                    error = {"error": f"model {body['model']!r} is broken"}
                    self._reply(upstream.chat_status, error)
                elif self.path == "/api/chat":
                    self._reply(200, {"model": body["model"], "done": True,
                                      "message": {"role": "assistant", "content": "H"}})
                elif self.path == "/v1/chat/completions":
                    self._reply(200, {"object": "chat.completion", "choices": [],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
                else:
                    self._reply(404, {"error": "not found"})

        self.chat_status = chat_status
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.server.shutdown()
        finally:
            self.server.server_close()
            self.thread.join(5)


def channel_cfg(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text("[[channels]]\n" + body)
    return path


def test_test_ollama_channel(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEYGATE_TEST_OLLAMA_KEY", "sk-never-printed")
    with Upstream() as upstream:  # stopped by __exit__, also when the test fails
        cfg = channel_cfg(tmp_path, f'name = "local"\nkind = "ollama"\n'
                                    f'base_url = "{upstream.url}"\nmodels = ["llama3.2:*"]\n'
                                    'api_key_env = "KEYGATE_TEST_OLLAMA_KEY"\n'
                                    '[channels.model_map]\n"gpt-4o-mini" = "qwen2.5:7b"\n')
        assert run(cfg, "test", "local") == 0
    out, err = capsys.readouterr()
    assert "sk-never-printed" not in out + err
    lines = out.splitlines()
    assert "/api/tags -> 200 OK in " in lines[1] and "3 models: llama3.2:1b, qwen2.5:7b" in lines[1]
    assert "/api/chat (model qwen2.5:7b) -> 200 OK in " in lines[2] and lines[2].endswith(" ms")
    assert lines[-1] == "ok: channel local"
    (m1, p1, h1, _), (m2, p2, h2, body) = upstream.requests
    assert (m1, p1, m2, p2) == ("GET", "/api/tags", "POST", "/api/chat")
    assert h1["Authorization"] == h2["Authorization"] == "Bearer sk-never-printed"
    assert body == {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}],
                    "stream": False, "options": {"num_predict": 1}}


def test_test_openai_channel_picks_a_listed_model(tmp_path, capsys):
    with Upstream() as upstream:
        cfg = channel_cfg(tmp_path, f'name = "ds"\nkind = "openai"\n'
                                    f'base_url = "{upstream.url}/v1"\n'
                                    'models = ["deepseek-*"]\n')
        assert run(cfg, "test", "ds") == 0
    out = capsys.readouterr().out
    assert "/v1/models -> 200 OK" in out and "2 models: other, deepseek-chat" in out
    assert "(model deepseek-chat) -> 200 OK" in out
    (_, p1, h1, _), (_, p2, _, body) = upstream.requests
    assert (p1, p2) == ("/v1/models", "/v1/chat/completions")
    assert "Authorization" not in h1  # no api_key_env: no credential
    assert body == {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1}


def test_test_reports_an_upstream_error(tmp_path, capsys):
    with Upstream(chat_status=500) as upstream:
        cfg = channel_cfg(tmp_path, f'name = "local"\nkind = "ollama"\n'
                                    f'base_url = "{upstream.url}"\nmodels = ["llama3.2:1b"]\n')
        assert run(cfg, "test", "local") == 1
    out = capsys.readouterr().out
    assert "/api/tags -> 200 OK" in out
    assert "(model llama3.2:1b) -> 500 Internal Server Error" in out and "is broken" in out
    assert out.splitlines()[-1] == "FAILED: channel local"


def test_test_shows_the_upstreams_names_escaped_and_cut(tmp_path, capsys):
    names = ("\x1b]0;pwned\x07", "x\nok: channel local", "\u202ey\x9b2J", "m" * 100_000)
    with Upstream(chat_status=500, tags=names) as upstream:
        cfg = channel_cfg(tmp_path, f'name = "local"\nkind = "ollama"\n'
                                    f'base_url = "{upstream.url}"\nmodels = ["*"]\n')
        assert run(cfg, "test", "local") == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 4 and all(line.isprintable() for line in lines)
    assert "4 models: \\x1b]0;pwned\\x07, x\\nok: channel local, \\u202ey\\x9b2J, mmm" in lines[1]
    assert "m…(+" in lines[1] and len(out) < 2_000
    assert "(model \\x1b]0;pwned\\x07) -> 500" in lines[2]
    assert lines[-1] == "FAILED: channel local"


def test_test_escapes_an_error_body(monkeypatch, tmp_path, capsys):
    def fetch(url, body, token, timeout):
        page = b"<h1>\x1b]0;pwned\x07\xc2\x9b2J</h1>"  # raw ESC, BEL and C1 CSI
        return chantool.Result(False, "502 Bad Gateway", 1.0, page)

    monkeypatch.setattr(chantool, "fetch", fetch)
    cfg = channel_cfg(tmp_path, 'name = "x"\nkind = "ollama"\nbase_url = "http://127.0.0.1:9"\n'
                                'models = ["llama3.2:1b"]\n')
    assert run(cfg, "test", "x") == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.isprintable() for line in lines)
    assert lines[1].endswith("-> 502 Bad Gateway in 1.0 ms; <h1>\\x1b]0;pwned\\x07\\x9b2J</h1>")


def test_test_does_not_follow_redirects(tmp_path, capsys):
    with Upstream() as upstream:
        cfg = channel_cfg(tmp_path, f'name = "r"\nkind = "ollama"\n'
                                    f'base_url = "{upstream.url}/redirect"\n'
                                    'models = ["*"]\n')
        assert run(cfg, "test", "r") == 1
    out = capsys.readouterr().out
    assert "-> 302" in out and "no model to try" in out
    assert [r[1] for r in upstream.requests] == ["/redirect/api/tags"]


def test_test_connection_refused(tmp_path, capsys):
    port = free_port()  # nothing listens there
    cfg = channel_cfg(tmp_path, f'name = "down"\nkind = "ollama"\nbase_url = "http://127.0.0.1:{port}"\n'
                                'models = ["llama3.2:1b"]\n')
    assert run(cfg, "test", "down", "--timeout", "5") == 1
    out = capsys.readouterr().out
    assert out.count("connection refused") == 2
    assert out.splitlines()[-1] == "FAILED: channel down"
