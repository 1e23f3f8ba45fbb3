"""The `Catalog` addon: model lists answered by keygate itself when channels are configured.

With several upstreams no single one can answer `GET /api/tags` or `GET /v1/models` for
the gateway, so keygate asks each channel for its own list (cached briefly), keeps the
models the channel serves, adds the `model_map` aliases, drops what the key may not use,
and answers in the endpoint's own wire format. Without channels the request goes to the
reverse target and the meter filters its answer instead.

`GET /api/ps` (the models loaded now, with digests and sizes) is not merged: it goes to one
Ollama server, and the meter filters its answer with `filter_running`, by the same rules
as /api/tags: only what the key may use and what that server's channel serves, aliases
included (docs/endpoints.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import urllib.request
from collections.abc import Awaitable
from dataclasses import dataclass

from mitmproxy import http

from keygate import direct
from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.model.keyring import Key
from keygate.model.settings import Channel, cloud_allowed
from keygate.request import state_of
from keygate.stages.config import Config
from keygate.stages.routing import Router

log = logging.getLogger("keygate")

TTL = 10.0  # seconds a channel's list is reused
FETCH_TIMEOUT = 5.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    created: int  # unix seconds
    owned_by: str
    tag: dict | None  # the /api/tags entry, for models of ollama channels


MAX_LIST_BYTES = 16 * 1024 * 1024  # a model list is kilobytes; past this it is not one


def fetch_json(url: str, headers: dict[str, str], timeout: float = FETCH_TIMEOUT) -> object:
    """Blocking GET of a JSON document, direct and without redirects (keygate/direct.py);
    run it in a thread."""
    req = urllib.request.Request(url, headers={"accept": "application/json", **headers})
    with direct.opener().open(req, timeout=timeout) as resp:
        body = resp.read(MAX_LIST_BYTES + 1)
    if len(body) > MAX_LIST_BYTES:
        raise ValueError(f"a model list over {MAX_LIST_BYTES} bytes")
    return json.loads(body)


def _unix(ts: object) -> int:
    if not isinstance(ts, str):
        return 0
    try:
        # Go writes nanoseconds; fromisoformat takes at most microseconds. The fraction
        # is the digits right after the dot; the zone (Z, +hh:mm, -hh:mm) follows.
        head, dot, frac = ts.partition(".")
        if dot:
            n = len(frac) - len(frac.lstrip("0123456789"))
            ts = f"{head}.{frac[:min(n, 6)]}{frac[n:]}"
        return int(dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _owned_by(name: str) -> str:
    """Ollama's rule: the namespace of the name, "library" for plain names."""
    parts = name.split(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def parse_list(channel: Channel, doc: object) -> list[ModelInfo]:
    out = []
    if channel.kind == "ollama":
        models = doc.get("models") if isinstance(doc, dict) else None
        for m in models or []:
            name = isinstance(m, dict) and (m.get("model") or m.get("name"))
            if isinstance(name, str) and name:
                out.append(ModelInfo(name, _unix(m.get("modified_at")), _owned_by(name), m))
    else:
        data = doc.get("data") if isinstance(doc, dict) else None
        for m in data or []:
            name = isinstance(m, dict) and m.get("id")
            if isinstance(name, str) and name:
                created = m.get("created") if isinstance(m.get("created"), int) else 0
                owned = m.get("owned_by") if isinstance(m.get("owned_by"), str) else channel.name
                out.append(ModelInfo(name, created, owned, None))
    return out


def served(channel: Channel, listed: list[ModelInfo]) -> list[ModelInfo]:
    """What the channel lists and serves, then its aliases (named after their targets)."""
    out = [m for m in listed if channel.serves(m.name)]
    by_name = {m.name: m for m in listed}
    for alias, target in channel.model_map.items():
        base = by_name.get(target) or by_name.get(target + ":latest")
        if base is None:
            out.append(ModelInfo(alias, 0, channel.name, None))
            continue
        tag = dict(base.tag, name=alias, model=alias) if base.tag is not None else None
        out.append(ModelInfo(alias, base.created, base.owned_by, tag))
    return out


def filter_running(doc: dict, key: Key | None, channel: Channel | None,
                   channels: tuple[Channel, ...]) -> bool:
    """Keep in an /api/ps answer (`doc["models"]`) only the models `key` may use, as
    /api/tags shows them: with channels, what `channel` (the one that answered) serves,
    its aliases for loaded targets included, named as the key asks for them; without, the
    names the key's patterns cover. Returns whether `doc` was changed."""
    models = doc.get("models")
    if not isinstance(models, list):
        return False
    if key is None:
        doc["models"] = []
        return True
    if channel is None:
        doc["models"] = [m for m in models if isinstance(m, dict) and _usable(
            m.get("name") or m.get("model"), key, channels)]
        return True
    doc["models"] = [m.tag for m in served(channel, parse_list(channel, doc))
                     if m.tag is not None and key.may_use(m.name)]
    return True


def _usable(name: object, key: Key, channels: tuple[Channel, ...]) -> bool:
    return isinstance(name, str) and key.may_use(name) and cloud_allowed(name, channels)


class Catalog:
    def __init__(self, config: Config, router: Router, fetch=fetch_json, clock=time.monotonic):
        self.config = config
        self.router = router
        self.fetch = fetch
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, list[ModelInfo]]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future] = {}

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Plain, not async: every request passes here and only model lists need a coroutine.
        if flow.response or flow.error or not flow.live:
            return None
        channels = self.config.state.settings.channels
        if not channels:
            return None
        path = endpoints.client_path(flow)
        ep = endpoints.classify(flow.request.method, path)
        if ep is None or ep.kind not in ("list", "model"):
            return None
        key = self.config.state.keys.by_name.get(state_of(flow).key)
        if key is None:
            return None
        return self._answer(flow, ep, path, key, channels)

    async def _answer(self, flow: http.HTTPFlow, ep: endpoints.Endpoint, path: str, key: Key,
                      channels: tuple[Channel, ...]) -> None:
        native = ep.path == "/api/tags"
        merged: dict[str, ModelInfo] = {}
        for ch in sorted(channels, key=lambda c: -c.priority):
            if native and ch.kind != "ollama":
                continue
            for m in served(ch, await self.listing(ch)):
                if m.name not in merged and key.may_use(m.name):
                    merged[m.name] = m
        models = list(merged.values())

        if ep.kind == "model":
            wanted = endpoints.path_model(path)
            m = merged.get(wanted)
            if m is None:
                refuse(flow, "model_not_found", f"The model '{wanted}' does not exist.")
                return
            body = {"id": wanted, "object": "model", "created": m.created, "owned_by": m.owned_by}
        elif native:
            body = {"models": [m.tag if m.tag is not None else _bare_tag(m) for m in models]}
        else:
            body = {"object": "list", "data": [
                {"id": m.name, "object": "model", "created": m.created, "owned_by": m.owned_by}
                for m in models]}
        content = json.dumps(body, separators=(",", ":")).encode()
        ctype = "application/json; charset=utf-8"
        if flow.request.method == "HEAD":
            # make() sets the length of the body it is given: the length of the GET's
            # body goes in after it.
            flow.response = http.Response.make(200, b"", {"content-type": ctype})
            flow.response.headers["content-length"] = str(len(content))
        else:
            flow.response = http.Response.make(200, content, {"content-type": ctype})

    async def listing(self, ch: Channel) -> list[ModelInfo]:
        """The channel's own list, from cache when fresh; [] when it cannot be had."""
        ident = (ch.name, ch.base_url)
        hit = self._cache.get(ident)
        if hit and self.clock() - hit[0] < TTL:
            return hit[1]
        pending = self._pending.get(ident)
        if pending is None:
            pending = asyncio.ensure_future(self._load(ch))
            self._pending[ident] = pending
            pending.add_done_callback(lambda _: self._pending.pop(ident, None))
        return await asyncio.shield(pending)

    async def _load(self, ch: Channel) -> list[ModelInfo]:
        url = ch.base_url.rstrip("/") + ("/api/tags" if ch.kind == "ollama" else "/models")
        headers = {"authorization": f"Bearer {ch.api_key}"} if ch.api_key else {}
        try:
            doc = await asyncio.to_thread(self.fetch, url, headers)
        except Exception as e:  # any failure: the channel just lists nothing this time
            log.warning("keygate: channel %s: cannot list models (%s)", ch.name,
                        getattr(e, "reason", None) or e)
            self.router.health.failure(ch.name)
            stale = self._cache.get((ch.name, ch.base_url))
            return stale[1] if stale else []
        models = parse_list(ch, doc)
        self._cache[(ch.name, ch.base_url)] = (self.clock(), models)
        return models


def _bare_tag(m: ModelInfo) -> dict:
    """An /api/tags entry for an alias whose target the upstream does not list."""
    return {"name": m.name, "model": m.name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
            "digest": "", "details": {"parent_model": "", "format": "", "family": "",
                                      "families": None, "parameter_size": "",
                                      "quantization_level": ""}}
