"""Header edits on the raw fields of a mitmproxy message.

mitmproxy's `Headers` mapping API (`h[name] = v`, `name in h`, `h.update(...)`) lower-cases
and scans every field once per call, in Python. keygate touches a few headers on every
response, so it edits `headers.fields` in one pass instead; the result is the same.
"""

from __future__ import annotations

from typing import Mapping

from mitmproxy import http


def text(value: bytes) -> str:
    """A raw header value as mitmproxy's `Headers` gives it."""
    return value.decode("utf-8", "surrogateescape")


def has_field(headers: http.Headers, name: bytes) -> bool:
    """Whether a header `name` (lower case) is present."""
    for f in headers.fields:
        if f[0].lower() == name:
            return True
    return False


def get_field(headers: http.Headers, name: bytes) -> str | None:
    """The first value of header `name` (lower case), decoded as `Headers` decodes it
    (`headers.get` would join repeated values with ", ")."""
    for f in headers.fields:
        if f[0].lower() == name:
            return text(f[1])
    return None


def set_fields(headers: http.Headers, values: Mapping[str, str]) -> None:
    """headers[name] = value for each item (names in lower case): any existing fields of
    those names are replaced, the new ones go last."""
    new = tuple([(k.encode("ascii"), v.encode("utf-8", "surrogateescape"))
                 for k, v in values.items()])
    names = {k for k, _ in new}
    fields = headers.fields
    for field in fields:
        if field[0].lower() in names:  # (rare: keygate's names are its own) rebuild
            fields = tuple([f for f in fields if f[0].lower() not in names])
            break
    headers.fields = fields + new


def decoded_body(message: http.Message) -> bytes | None:
    """The body as `message.get_content(strict=False)` gives it. Without a
    content-encoding (nearly always) that is the raw body, found without the mapping
    lookup get_content does first."""
    if not has_field(message.headers, b"content-encoding"):
        return message.raw_content
    return message.get_content(strict=False)
