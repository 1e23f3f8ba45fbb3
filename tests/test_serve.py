"""scripts/serve, the README's front door, run as a new user runs it: a copy of the checkout
with no config and keygate not yet installed, `--demo`, a real client, then SIGTERM to what
it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import openai
import pytest

from conftest import ROOT, Output, copy_checkout, eventually, free_port

START_TIMEOUT = 120.0  # the first run installs keygate into the venv


def layered_venv(path: Path) -> Path:
    """A new venv with this one's packages on its path (a .pth file) but no keygate: what
    scripts/serve installs into it is the copy of the checkout, from its pyproject.toml,
    with no download but the build backend's, and this venv stays as it was."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=120)
    (site,) = (path / "lib").glob("python3*/site-packages")
    base = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "keygate-test-base.pth").write_text("".join(f"{p}\n" for p in base))
    return path


@pytest.fixture
def serve(tmp_path):
    root = copy_checkout(tmp_path / "keygate", serve=True).parents[1]
    shutil.copy(ROOT / "README.md", root / "README.md")  # pyproject.toml's readme
    port = free_port()
    # As under systemd or docker: stdout is a pipe, and nothing in the environment asks
    # Python not to buffer it.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "KEYGATE_CONFIG")}
    env["KEYGATE_VENV"] = str(layered_venv(tmp_path / "venv"))
    proc = subprocess.Popen(
        [str(root / "scripts" / "serve"), "--demo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
        start_new_session=True,
    )
    try:
        yield (root, port, proc, Output("scripts/serve", proc, proc.stdout),
               Output("scripts/serve", proc, proc.stderr))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_demo_first_run(serve):
    root, port, proc, out, err = serve
    key = err.wait_for(r"^\s+sk-\S+\s*$", START_TIMEOUT).strip()
    assert (root / "config" / "gateway.toml").exists()
    assert (root / "config" / "keys.yaml").stat().st_mode & 0o077 == 0

    # keygate's own start-up lines reach the pipe before any request has been made:
    # mitmdump's output is not held back in a buffer.
    out.wait_for(r"keygate: config .*keys\.yaml \(1 keys\)", 30)
    out.wait_for(r"keygate: usage counters rebuilt", 30)

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=20,
                           max_retries=0)
    reply = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content.startswith("Hello from the fake model")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert "llama3.2:latest" in {m.id for m in client.models.list()}
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong",
                      max_retries=0, timeout=20).models.list()
    assert refused.value.status_code == 401

    log = root / "logs" / "usage.jsonl"
    assert eventually(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, 10)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["key"], r["status"]) for r in records] == [
        ("first-key", 200), ("first-key", 200), (None, 401)]

    # SIGTERM to the group, as systemd and a terminal's Ctrl-C reach it: everything the
    # script started ends with it.
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    assert eventually(lambda: not group_alive(proc.pid), 10)
    assert key not in out.all() and key not in log.read_text()
