"""`keygate serve` (scripts/serve): run keygate, that is mitmdump in reverse-proxy mode with
keygate's addons (README.md, Commands).

    keygate serve [--listen HOST:PORT] [--upstream URL] [--demo] [--config PATH] [--workers N]
                  [-- MITMDUMP ARGS]

First run: the default config/gateway.toml and the keys file it names are written from the
commented examples beside it, and a keys file without keys gets a first key, printed once
on stderr. `--demo` also starts the bundled demo upstream (a small Ollama look-alike), so
keygate can be tried on a machine without Ollama. `--workers N` runs N mitmdump processes on
the one port, sharing limits through Redis (keygate/cli/workers.py; it needs redis_url).

mitmdump runs in this process (mitmproxy.tools.main.mitmdump), so there is no second
program to find on PATH and no signal to pass on: mitmproxy's own SIGTERM and SIGINT
handling stops it, and then the demo upstream is stopped too. Its output is line-buffered:
to a pipe (systemd's journal, `docker logs`, a pager) Python would hold it in a block
buffer, and a line such as a rejected reload would wait for the next request to be seen.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click

import keygate
from keygate.cli.common import (
    CHECKOUT,
    CONTEXT_SETTINGS,
    DEFAULT_CONFIG,
    Command,
    UserError,
    config_path,
    note,
)
from keygate.cli.keys import add_key
from keygate.cli.tables import escape
from keygate.model.keyring import load_keys
from keygate.model.settings import ConfigError, load_settings

PROG = "serve"
DEFAULT_LISTEN = "127.0.0.1:3000"
DEFAULT_UPSTREAM = "http://127.0.0.1:11434"
FIRST_KEY = "first-key"
DEMO_START_S = 15.0
PASSTHROUGH = "keygate.mitmdump_args"  # where the words after `--` wait in ctx.meta


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); an IPv6 host may be written in brackets, [::1]:3000."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--listen takes HOST:PORT, not {listen}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def gateway_script() -> Path:
    """The gateway.py that goes with the keygate package being run: the top-level module
    `gateway` installed beside it, which in a checkout is addons/gateway.py."""
    beside = Path(keygate.__file__).resolve().parents[1] / "gateway.py"
    if beside.is_file():
        return beside
    spec = importlib.util.find_spec("gateway")
    if spec is not None and spec.origin and Path(spec.origin).name == "gateway.py":
        return Path(spec.origin)
    raise UserError(f"cannot find gateway.py, the script mitmdump runs (looked beside "
                    f"{Path(keygate.__file__).parent} and for the installed module 'gateway'); "
                    "reinstall keygate", 1)


def first_run(config: Path) -> Path:
    """Write the default gateway.toml and the keys file it names from the examples, where
    they are missing; return the keys file."""
    if not config.parent.is_dir():
        raise UserError(f"the folder of {config} does not exist")
    example = DEFAULT_CONFIG.with_name("gateway.example.toml")
    if not config.exists() and config == DEFAULT_CONFIG.resolve() and example.is_file():
        shutil.copyfile(example, config)
        note("keygate", f"wrote {config} from the example")
    try:
        keys_file = load_settings(config).keys_file
    except ConfigError as e:
        raise UserError(str(e)) from None
    example = DEFAULT_CONFIG.with_name("keys.example.yaml")
    if not keys_file.exists() and example.is_file():
        keys_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(example, keys_file)
        keys_file.chmod(0o600)
        note("keygate", f"wrote {keys_file} from the example")
    return keys_file


def first_key(config: Path, keys_file: Path, listen: str) -> None:
    """A keys file without keys gets one, printed once: a first run must end with a key
    that works, or the newcomer's first request is a 401."""
    try:
        if keys_file.exists() and len(load_keys(keys_file)):
            return
    except ConfigError as e:
        raise UserError(str(e)) from None
    _, secret, _ = add_key(str(config), FIRST_KEY)
    print(f"""
  keygate: {escape(str(keys_file))} had no keys, so it now has one, named "{FIRST_KEY}".
  It is shown this once (only its sha256 is stored):

      {secret}

  Try it:  curl -H "Authorization: Bearer {secret}" http://{escape(listen)}/v1/models
""", file=sys.stderr, flush=True)


def start_demo() -> tuple[subprocess.Popen, str]:
    """Start the demo upstream on a free loopback port; return it and its URL."""
    script = CHECKOUT / "demo" / "fakeollama.py"
    if not script.is_file():
        raise UserError(f"--demo needs the demo upstream, demo/fakeollama.py of a keygate "
                        f"checkout, and {script} does not exist", 1)
    proc = subprocess.Popen(
        [sys.executable, "-u", str(script), "--host", "127.0.0.1", "--port", "0",
         "--chunk-delay-ms", "40"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    # It prints the URL it got as one line; read that, then keep its pipe drained.
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(DEMO_START_S)
    if not first or not first[0].strip():
        stop(proc)
        raise UserError("the demo upstream did not start", 1)
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    url = first[0].split()[-1]
    note("keygate", f"demo upstream (a small Ollama look-alike) at {url}")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mitmdump_args(upstream: str, host: str, port: int, script: Path, config: Path,
                  confdir: Path, extra: list[str]) -> list[str]:
    """The mitmdump command line keygate runs with: reverse mode, keygate's addons
    and config, a confdir of its own, block_global=false (keygate does the access control
    that option stands in for) and connection_strategy=lazy (no upstream connection for a
    request keygate refuses), then whatever followed `--`."""
    return [
        "--mode", f"reverse:{upstream}",
        "--listen-host", host, "--listen-port", str(port),
        "-s", str(script),
        "--set", f"keygate_config={config}",
        "--set", f"confdir={confdir}",
        "--set", "block_global=false",
        "--set", "connection_strategy=lazy",
        *extra,
    ]


def needs_redis(config: Path, workers: int) -> None:
    """Several workers only with shared counters: each would otherwise enforce every key's
    limits on its own, multiplying them."""
    try:
        settings = load_settings(config)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if not settings.redis_url:
        raise UserError(
            f"--workers {workers} needs [gateway] redis_url (or redis_url_env) in {config}: "
            "without counters shared through Redis, every worker would enforce each key's "
            f"limits on its own, {workers} times over (docs/shared-state.md)")


def _stopped(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class ServeCommand(Command):
    """`serve`, whose words after `--` are mitmdump's, however they look."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            ctx.meta[PASSTHROUGH] = args[at + 1:]
            args = args[:at]
        return super().parse_args(ctx, args)


@click.command("serve", cls=ServeCommand, context_settings=CONTEXT_SETTINGS,
               options_metavar="[OPTIONS] [-- MITMDUMP ARGS]")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="address to serve on")
@click.option("--upstream", default=DEFAULT_UPSTREAM, show_default=True, metavar="URL",
              help="where requests go when gateway.toml has no [[channels]]")
@click.option("--demo", is_flag=True,
              help="also start the bundled demo upstream and send requests there")
@click.option("--config", metavar="PATH",
              help=f"gateway.toml (default: $KEYGATE_CONFIG, else {DEFAULT_CONFIG})")
@click.option("--workers", default=1, show_default=True, metavar="N",
              type=click.IntRange(1, 256),
              help="mitmdump processes on the one port (more than 1 needs redis_url)")
@click.pass_context
def cli(ctx: click.Context, listen: str, upstream: str, demo: bool, config: str | None,
        workers: int) -> int:
    """Run keygate: mitmdump in reverse-proxy mode with keygate's addons, block_global=false,
    connection_strategy=lazy and a confdir of its own.

    First run: writes config/gateway.toml and the keys file from the examples, and creates
    and prints a first key. --demo also starts the bundled demo upstream (a small Ollama
    look-alike), so keygate can be tried on a machine without Ollama. Words after `--` go
    to mitmdump as they are."""
    host, port = split_listen(listen)
    script = gateway_script()
    path = config_path(config)
    keys_file = first_run(path)
    if workers > 1:
        needs_redis(path, workers)
    first_key(path, keys_file, listen)

    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    # Until mitmproxy takes SIGTERM over: stop here too, through the `finally` below.
    previous = signal.signal(signal.SIGTERM, _stopped)
    demo_proc = None
    try:
        if demo:
            demo_proc, upstream = start_demo()
        confdir = CHECKOUT / ".keygate" / "mitmproxy"
        confdir.mkdir(parents=True, exist_ok=True)
        extra = ctx.meta.get(PASSTHROUGH, [])
        if workers > 1:
            from keygate.cli.workers import serve_workers

            return serve_workers(workers, host, port, lambda p: mitmdump_args(
                upstream, host, p, script, path, confdir, extra))
        from mitmproxy.tools.main import mitmdump

        mitmdump(mitmdump_args(upstream, host, port, script, path, confdir, extra))
    finally:
        signal.signal(signal.SIGTERM, previous)
        if demo_proc is not None:
            stop(demo_proc)
    return 0
