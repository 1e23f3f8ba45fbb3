"""Keep the bytes clients send out of mitmproxy's own log lines.

mitmproxy logs a malformed or unfinished request head as the raw bytes it received,
before any addon hook runs: "Invalid header line: b'Authorization Bearer sk-...'" for a
header line without a colon, "Client closed connection before completing request
headers: b'...'" with every header of a head cut off before its blank line (a client
leaving, or keygate closing a slow client). Those bytes hold whatever key the client
sent. A logging filter on mitmproxy's connection logger replaces every bytes literal in
its messages by its length, so the line still says what happened and from where.
"""

from __future__ import annotations

import logging
import re

LOGGER = "mitmproxy.proxy.server"  # where mitmproxy's connection handlers log

# A Python bytes literal as repr() writes one: b'...' or b"...", escapes included.
_BYTES = re.compile(r"""(?<![\w'"])b(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", re.S)


# Work per message is bounded whatever a client sent: the message is cut to this many
# characters before anything else is done with it.
MAX_MESSAGE = 2000


_OPEN = re.compile(r"""(?<![\w'"])b['"]""")


def redact(message: str) -> str:
    more = len(message) - MAX_MESSAGE
    if more > 0:
        message = message[:MAX_MESSAGE]
    clean = _BYTES.sub(lambda m: f"<{len(m.group()) - 3} characters of the request, "
                                 "not shown>", message)
    # A literal the cut left open (or one never closed) did not match: drop its rest.
    opened = _OPEN.search(clean)
    if opened is not None:
        clean = clean[:opened.start()] + "<request bytes, not shown>"
    if more > 0:
        clean += f" <{more} more characters cut>"
    return clean


class RedactWire(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken record is the logging module's to report
            return True
        if "b'" in msg or 'b"' in msg or len(msg) > MAX_MESSAGE:
            clean = redact(msg)
            if clean != msg:
                record.msg, record.args = clean, ()
        return True


def install() -> None:
    """Add the filter once per process (gateway.py may be loaded again and again)."""
    logger = logging.getLogger(LOGGER)
    if not any(type(f).__name__ == RedactWire.__name__ for f in logger.filters):
        logger.addFilter(RedactWire())
