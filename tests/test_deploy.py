"""deploy/entrypoint.sh, the container's entrypoint, run by a real sh in front of a stand-in
for the mitmproxy image's own entrypoint (which prints what it was asked to run).

The image's entrypoint drops root only for a command whose first word is mitmdump, so
keygate's command line must reach it in that form."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from conftest import ROOT

ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"


@pytest.fixture
def run_entrypoint(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "docker-entrypoint.sh"
    stand_in.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stand_in.chmod(0o755)
    (tmp_path / "keygate.pem").write_text("")  # a file a stray glob would expand to

    def run(*args: str) -> list[str]:
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}",
               "KEYGATE_UPSTREAM": "http://ollama:11434"}
        res = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=10)
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()

    return run


KEYGATE = [
    "mitmdump", "--mode", "reverse:http://ollama:11434", "--listen-port", "3000",
    "-s", "/keygate/addons/gateway.py",
    "--set", "keygate_config=/keygate/config/gateway.toml",
    "--set", "block_global=false", "--set", "connection_strategy=lazy",
]


def test_no_arguments_run_keygate_as_mitmdump(run_entrypoint):
    assert run_entrypoint() == KEYGATE


def test_options_go_to_mitmdump_word_for_word(run_entrypoint):
    assert run_entrypoint("--certs", "*=/keygate/config/keygate.pem", "--set", "a=b c") == [
        *KEYGATE, "--certs", "*=/keygate/config/keygate.pem", "--set", "a=b c"]


def test_another_command_runs_as_given(run_entrypoint):
    assert run_entrypoint("sh", "-c", "echo *") == ["sh", "-c", "echo *"]


def test_entrypoint_is_executable_and_the_image_uses_it():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "COPY deploy/entrypoint.sh /keygate/entrypoint.sh" in dockerfile
    assert 'ENTRYPOINT ["/keygate/entrypoint.sh"]' in dockerfile


@pytest.mark.parametrize("tool", ["keys", "channels", "usage"])
def test_keygate_tools_run_the_keygate_command(run_entrypoint, tool):
    assert run_entrypoint(tool, "--help") == ["keygate", tool, "--help"]


def test_the_image_installs_keygate_and_uses_its_command():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    # The checkout is installed, so the entrypoint's gateway.py is the installed one's.
    assert "COPY pyproject.toml README.md /keygate/" in dockerfile
    assert "COPY addons /keygate/addons" in dockerfile
    assert "RUN pip install --no-cache-dir -e /keygate" in dockerfile
    assert "docker exec keygate keygate keys add alice" in dockerfile
    assert "python -m keygate" not in dockerfile
    assert "-s /keygate/addons/gateway.py" in ENTRYPOINT.read_text()
