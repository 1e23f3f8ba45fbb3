"""The filter that keeps request bytes out of mitmproxy's own log lines."""

from __future__ import annotations

import logging

import pytest

from keygate.edge import redact
from keygate.edge.redact import LOGGER, RedactWire

KEY = "sk-" + "A1b2" * 12


@pytest.mark.parametrize("message", [
    f"127.0.0.1:5555: Invalid header line: b'Authorization Bearer {KEY}'",
    f"Client closed connection before completing request headers: b'GET / HTTP/1.1\\r\\n"
    f"Host: x\\r\\nAuthorization: Bearer {KEY}\\r\\n'",
    f'Client closed connection before completing request headers: b"it\'s {KEY}"',
    f"two: b'{KEY}' and b'{KEY}\\\\'",
])
def test_bytes_literals_are_replaced_by_their_length(message):
    out = redact.redact(message)
    assert KEY not in out
    assert "characters of the request, not shown>" in out
    assert out.split(":")[0] == message.split(":")[0]  # what and from where stay


@pytest.mark.parametrize("message", [
    "client connect", "Client(127.0.0.1:5555, state=open)", "web'site b-side 'quoted'",
    "server disconnect 127.0.0.1:11434",
])
def test_other_lines_are_left_alone(message):
    assert redact.redact(message) == message


def test_filter_rewrites_records_of_mitmproxys_connection_logger(caplog):
    redact.install()
    redact.install()  # a reloaded gateway.py installs again: still one filter
    logger = logging.getLogger(LOGGER)
    assert sum(isinstance(f, RedactWire) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=LOGGER):
        logger.info("%s: Invalid header line: %r", "127.0.0.1:1", f"Bearer {KEY}".encode())
        logger.info("client connect")
    assert KEY not in caplog.text
    assert "Invalid header line: <" in caplog.text and "client connect" in caplog.text
