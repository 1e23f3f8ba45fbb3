"""The `keygate` command: keys, channels, usage and serve as subcommands of one click group
(README.md, Commands). scripts/keys, scripts/channels, scripts/usage and scripts/serve
install keygate into the checkout's .venv and then run it.

    keygate keys add alice --rpm 60        keygate channels list
    keygate usage --since 24h --by key     keygate serve --demo

One group gives every subcommand the same --help, the same errors and exit statuses
(keygate.cli.common.run_tool) and shell completion, key and channel names included:

    eval "$(_KEYGATE_COMPLETE=bash_source keygate)"     # or zsh_source, fish_source
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import click

from keygate.cli import channels, keys, serve, usage
from keygate.cli.common import CONTEXT_SETTINGS, Group, run_tool


class Keygate(Group):
    """The top-level group: click's own handling of errors and exits is replaced by
    keygate's, in standalone mode (the console script, click.testing.CliRunner) and not."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        # Errors are signed with the subcommand's name ("keys: no key named 'bob'"); the
        # group itself has no options, so that is the first word.
        prog = argv[0] if argv and argv[0] in self.commands else "keygate"
        code = run_tool(lambda: super(Keygate, self).main(
            argv, prog_name or "keygate", complete_var, standalone_mode=False, **extra), prog)
        if standalone_mode:
            sys.exit(code)
        return code


@click.group("keygate", cls=Keygate, context_settings=CONTEXT_SETTINGS)
def cli() -> None:
    """keygate: API keys, per-key policy, model routing and usage accounting in front of
    Ollama and OpenAI-compatible servers.

    Shell completion: eval "$(_KEYGATE_COMPLETE=bash_source keygate)" (or zsh_source,
    fish_source)."""


cli.add_command(keys.cli)
cli.add_command(channels.cli)
cli.add_command(usage.cli)
cli.add_command(serve.cli)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script `keygate` (pyproject.toml); returns the exit status, so tests can
    call it with a list of words."""
    return cli.main(argv, "keygate", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
