"""The `keygate` command and its subcommands (keys, channels, usage, serve), with the
helpers they share."""
