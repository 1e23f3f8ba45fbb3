"""keygate/configuration.py: the Config addon's start-up work."""

from __future__ import annotations

import asyncio

from mitmproxy.addons.block import Block
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from keygate import configuration
from keygate.configuration import Config


def test_start_up_objects_are_frozen_once_per_process(monkeypatch, tmp_path):
    (tmp_path / "keys.yaml").write_text("keys:\n  alice:\n    key: sk-alice-0123456789\n")
    (tmp_path / "gateway.toml").write_text('[gateway]\nkeys_file = "keys.yaml"\n')
    frozen: list[int] = []
    monkeypatch.setattr(configuration.gc, "freeze", lambda: frozen.append(len(frozen)))
    monkeypatch.setattr(configuration, "_frozen", False)

    async def main():
        with taddons.context(Proxyserver(), Block()) as tctx:
            config = Config()
            tctx.master.addons.add(config)
            tctx.configure(config, keygate_config=str(tmp_path / "gateway.toml"))
            config.running()
            assert frozen == [0]  # after the keys were read: they are part of what is frozen
            assert len(config.state.keys) == 1
            config.done()
            tctx.master.addons.remove(config)
            # A reload of gateway.py makes a new Config and runs it: no second freeze,
            # which would also freeze the flows then in flight.
            again = Config()
            tctx.master.addons.add(again)
            tctx.configure(again, keygate_config=str(tmp_path / "gateway.toml"))
            again.running()
            again.done()

    asyncio.run(main())
    assert frozen == [0]
