"""What the `keygate` subcommands share: user errors and how every error becomes one line
and an exit status, the config path, gateway.toml read the way a tool needs it, the
atomic write and the folder lock of every file edit, and notes on stderr.

Exit statuses, the same in every subcommand: 0 done; 1 the thing named does not exist,
an upstream test failed, or the system refused (a file that cannot be written); 2 the
command line or a file is wrong, nothing was changed; 130 interrupted.

Everything shown on the terminal that quotes a file, a log or an upstream goes through
keygate.cli.tables.escape: it must not act on the terminal or start a line of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import click

from keygate.cli.tables import escape
from keygate.files import write_atomic  # noqa: F401  (the commands' one way to write a file)
from keygate.model.settings import (  # noqa: F401  (CHECKOUT: for the commands)
    CHECKOUT,
    DEFAULT_CONFIG,
    ConfigError,
    Settings,
    default_settings,
    parse_settings,
)

PLACEHOLDER = "set-in-the-gateway-environment"
# A list's cells are cut (marked) beyond this many columns: as wide as the longest key name,
# so a name is never cut; a longer list of models is, and `--format json` shows it whole.
LIST_WIDTH = 128
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UserError(Exception):
    """A problem the operator can fix. Printed as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# --- files ------------------------------------------------------------------------------------


def config_path(arg: str | os.PathLike | None) -> Path:
    """--config, else $KEYGATE_CONFIG (hermetic tests, containers), else config/gateway.toml
    of the checkout."""
    raw = arg or os.environ.get("KEYGATE_CONFIG") or DEFAULT_CONFIG
    return Path(raw).expanduser().resolve()


def tool_environ(doc: Mapping[str, Any] | None) -> dict[str, str]:
    """os.environ plus a placeholder for every channel api_key_env that is unset here.

    The gateway's own environment holds the upstream credentials, often not the operator's
    shell: a command that only edits files must not fail because of that.
    """
    env = dict(os.environ)
    channels = (doc or {}).get("channels")
    if isinstance(channels, list):
        for ch in channels:
            var = ch.get("api_key_env") if isinstance(ch, dict) else None
            if isinstance(var, str) and var and not env.get(var):
                env[str(var)] = PLACEHOLDER
    return env


def read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8", newline="") as f:  # keep "\r\n" as it is
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}", 1) from None


def load_gateway(path: Path) -> Settings:
    """gateway.toml as the gateway reads it, except that unset api_key_env is tolerated."""
    text = read_text(path)
    if text is None:
        return default_settings(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        doc = None  # parse_settings reports it with the file name
    try:
        return parse_settings(text, path, environ=tool_environ(doc))
    except ConfigError as e:
        raise UserError(str(e)) from None


def reason(err: Exception, path: Path) -> str:
    """An error about a text that was never written, without its (meaningless) file:line."""
    msg = str(err)
    if msg.startswith(str(path)):
        msg = re.sub(r"^:(\d+:)?\s*", "", msg[len(str(path)):])
    return msg


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of two commands run at once.

    The lock is on the folder, not the file: the file is replaced by rename, so a lock on
    its inode would protect nothing. Advisory and best effort (released on close).
    """
    fd = None
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


# --- the terminal -----------------------------------------------------------------------------


def note(prog: str, msg: str) -> None:
    """One line on stderr. Escaped (keygate.cli.tables): a message may quote a file, a log or
    an upstream, and none of that may act on the terminal or start a line of its own."""
    print(f"{prog}: {escape(msg)}", file=sys.stderr)


def quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush does not complain."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run_tool(call: Callable[[], Any], prog: str) -> int:
    """Run a command line (`call`: click's main, not standalone) and turn what it raises
    into keygate's exit statuses and one-line messages.

    A mistake on the command line prints the usage line and `PROG: error: MESSAGE`, exit 2;
    a `UserError` prints `PROG: MESSAGE` with its own status. Unknown options and words are
    "unrecognized arguments" and a bad choice is an "invalid choice": the wording scripts
    that call keygate match on.
    """
    try:
        rv = call()
        return rv if isinstance(rv, int) else 0
    except click.UsageError as e:
        if isinstance(e, click.NoSuchOption):
            message = f"unrecognized arguments: {e.option_name}"
            if e.possibilities:
                message += f" (did you mean {', '.join(sorted(e.possibilities))}?)"
        else:
            message = e.format_message()
        if e.ctx is not None:
            print(e.ctx.get_usage(), file=sys.stderr)
        print(f"{prog}: error: {escape(message)}", file=sys.stderr)
        return e.exit_code
    except click.ClickException as e:
        note(prog, e.format_message())
        return e.exit_code
    except UserError as e:
        note(prog, str(e))
        return e.code
    except BrokenPipeError:  # `keygate keys list | head`: not an error worth a message
        quiet_stdout()
        return 1
    except OSError as e:
        note(prog, f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e))
        return 1
    except (click.Abort, KeyboardInterrupt):
        return 130


# --- click building blocks --------------------------------------------------------------------


class Command(click.Command):
    """A keygate command: words it does not take are "unrecognized arguments"."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.allow_extra_args = True
        rest = super().parse_args(ctx, args)
        if ctx.args and not ctx.resilient_parsing:
            raise click.UsageError(f"unrecognized arguments: {' '.join(ctx.args)}", ctx)
        return rest


class Group(click.Group):
    """A keygate command with subcommands. Without one it is a usage error (exit 2), as a
    missing argument is, rather than help on stdout that a script would take for output."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", False)
        kwargs.setdefault("context_settings", CONTEXT_SETTINGS)
        super().__init__(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """In the order they were added (the order of the docs), not alphabetical."""
        return list(self.commands)


Group.group_class = Group


class Count(click.ParamType):
    """A whole number >= 0 (a limit)."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if n < 0:
            self.fail(f"{value!r} must be >= 0", param, ctx)
        return n


COUNT = Count()


class OneOf(click.Choice):
    """click.Choice whose refusal reads "invalid choice: 'x' (choose from 'a', 'b')"."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices:
            return value
        choices = ", ".join(repr(c) for c in self.choices)
        self.fail(f"invalid choice: {value!r} (choose from {choices})", param, ctx)


def comma_list(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """`--opt a,b --opt c` -> ["a", "b", "c"]: comma-separated and repeatable."""
    items: list[str] = []
    for value in values:
        new = [v.strip() for v in value.split(",") if v.strip()]
        if not new:
            raise click.BadParameter("needs at least one value", ctx, param)
        items.extend(new)
    return items


def _config_from_parent(ctx: click.Context, param: click.Parameter, value: str | None):
    while value is None and ctx.parent is not None:
        ctx = ctx.parent
        value = ctx.params.get("config")
    return value


def config_option(help_text: str) -> Callable:
    """--config PATH, taken before the subcommand (on the tool) and after it alike: a
    subcommand's value wins, else the tool's."""
    return click.option("--config", metavar="PATH", default=None, help=help_text,
                        callback=_config_from_parent)
