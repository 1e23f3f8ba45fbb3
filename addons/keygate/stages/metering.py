"""The `Meter` addon: token counts from upstream responses, and the few edits keygate makes
to what comes back (docs/configuration.md, docs/endpoints.md, docs/usage-log.md).

Streamed responses (NDJSON and server-sent events) pass through a `StreamMeter`, called by
mitmproxy once per received chunk. It never holds more than one incomplete line or event:
when it has nothing to change it hands every chunk on untouched at once and only looks; when
it must edit (a model alias to turn back, usage keygate asked for to take out) it hands on
each complete frame as soon as the frame is complete. Non-streamed bodies are small JSON
documents read whole in the response hook.

A stream that ends before the upstream's counts (the client left, the upstream broke off)
still counts what it consumed (docs/usage-log.md): the meter counts the content frames it passed on
(an NDJSON line, an SSE data event that carries generated text), and such a stream is
logged with completion_tokens = that count (one token a frame, unless a count the
upstream sent along the way says more) and `tokens_estimated: true`. On the path that
passes chunks unparsed the count is a byte count (newlines, "data:" line starts): a few
hundred nanoseconds a chunk.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from mitmproxy import http

from keygate.model import endpoints
from keygate.model.errors import make_error
from keygate.model.settings import cloud_allowed
from keygate.request import state_of
from keygate.stages.catalog import filter_running
from keygate.stages.config import Config
from keygate.stages.headerfields import decoded_body, get_field
from keygate.stages.recorder import set_cost

log = logging.getLogger("keygate")

MAX_FRAME = 1024 * 1024  # bytes of one unfinished line or event held to read it
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
_SSE_SEP = re.compile(rb"\r?\n\r?\n")
# A native line worth parsing when nothing is being edited: the final chunk with the
# counts, an error, or the end of a progress stream. Other lines pass unparsed.
_NATIVE_END = re.compile(rb'"done"\s*:\s*true|"error"\s*:|"status"\s*:\s*"success"')


def _marked(buf: bytes, sse: bool) -> bool:
    """Whether `buf` may hold a frame worth parsing. Bytes of an event stream without any
    of these hold no counts, no error, no end marker and no named event (see
    StreamMeter._look_event). (Substring tests: an alternation in `re` takes ~2x as long
    on a typical 250-byte chunk.)"""
    if sse:
        return (b'"usage"' in buf or b'"error"' in buf or b"[DONE]" in buf
                or b"event:" in buf)
    return _NATIVE_END.search(buf) is not None


def _frames_end(buf: bytes, sse: bool) -> int:
    """Where the last complete frame of `buf` ends (0: none does): after the last event
    separator (a blank line: LF LF, CR LF CR LF or a mix), or the last LF of NDJSON."""
    if not sse:
        return buf.rfind(b"\n") + 1
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


@dataclass
class TokenCounts:
    """What a response said about itself, filled in as it passes."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None  # when the upstream states it
    finished: bool = False  # the upstream's own end marker was seen
    upstream_error: bool = False  # an {"error": ...} line or event
    frames: int = 0  # content frames passed on (streams): the estimate when counts are missing
    cached_tokens: int = 0  # prompt tokens the upstream served from its cache, where it says

    def estimate(self) -> bool:
        """Whether the stream ended before the upstream's completion count, with more
        content frames gone out than the count so far says (none, for native streams; a
        provisional one in Anthropic's message_start): then the frames count instead."""
        return not self.finished and self.frames > self.completion_tokens


# Events of named-event streams that carry generated text (Anthropic, /v1/responses); the
# others (message_start, content_block_start, response.created, pings, ...) carry none.
def _content_event(event: bytes) -> bool:
    return event == b"content_block_delta" or (
        event.startswith(b"response.") and event.endswith(b".delta"))


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def read_usage(api: str, doc: dict, tally: TokenCounts) -> None:
    """Take token counts from one JSON document (a whole body, a line or an event)."""
    if api == "ollama":
        if "prompt_eval_count" in doc or "eval_count" in doc:
            tally.prompt_tokens = _int(doc.get("prompt_eval_count"))
            tally.completion_tokens = _int(doc.get("eval_count"))
        return
    if api == "responses" and isinstance(doc.get("response"), dict):
        doc = doc["response"]  # the response.completed event
    if api == "anthropic":
        msg = doc.get("message")
        usage = msg.get("usage") if isinstance(msg, dict) else doc.get("usage")
        if isinstance(usage, dict):
            if "input_tokens" in usage:
                # Anthropic's input_tokens leaves out the prompt tokens read from or written
                # to its cache: they are prompt tokens all the same (docs/usage-log.md).
                cached = _int(usage.get("cache_read_input_tokens"))
                tally.prompt_tokens = (_int(usage.get("input_tokens")) + cached
                                       + _int(usage.get("cache_creation_input_tokens")))
                tally.cached_tokens = cached
            if "output_tokens" in usage:
                tally.completion_tokens = _int(usage.get("output_tokens"))
        return
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return
    if api == "responses":
        tally.prompt_tokens = _int(usage.get("input_tokens"))
        tally.completion_tokens = _int(usage.get("output_tokens"))
        details = usage.get("input_tokens_details")
    else:
        tally.prompt_tokens = _int(usage.get("prompt_tokens"))
        tally.completion_tokens = _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
    # Cached prompt tokens, among the prompt tokens (OpenAI's usage details).
    tally.cached_tokens = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    if "total_tokens" in usage:
        tally.total_tokens = _int(usage.get("total_tokens"))


def rename_model(doc: dict, upstream: str, client: str) -> bool:
    """Put the client's model name back where the upstream echoes its own
    (docs/configuration.md)."""
    changed = False
    for holder in (doc, doc.get("response"), doc.get("message")):
        if isinstance(holder, dict) and holder.get("model") == upstream:
            holder["model"] = client
            changed = True
    return changed


def dumps(doc: object) -> bytes:
    # Compact, as Ollama and OpenAI-compatible servers write their JSON.
    try:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate escape: keep it escaped
        return json.dumps(doc, separators=(",", ":")).encode()


class StreamMeter:
    """The `flow.response.stream` callable for one streamed response."""

    def __init__(self, api: str, sse: bool, tally: TokenCounts,
                 alias: tuple[str, str] | None = None, strip_usage: bool = False) -> None:
        self.api = api
        self.sse = sse
        self.tally = tally
        self.alias = alias
        self.strip_usage = strip_usage
        self.edits = alias is not None or strip_usage
        self.pending = b""
        self.broken = False

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        # mitmproxy calls this inside its protocol layer, where an exception would end the
        # stream with nothing sent: whatever goes wrong, the data goes on.
        if self.broken:
            return data
        held = self.pending
        if len(held) > MAX_FRAME:
            # A frame this long is not a token chunk: holding it would grow without end,
            # and every chunk would scan it again. It is passed on as it is, unread.
            log.warning("keygate: a streamed response's frame passed %d bytes; passing the "
                        "rest through unread", MAX_FRAME)
            self.broken = True
            self.pending = b""
            return held + data if self.edits else data
        try:
            return self._feed(data)
        except Exception:
            log.exception("keygate: could not read a streamed response; passing it through")
            self.broken = True
            self.pending = b""
            # What was held back from earlier chunks goes out first, then this chunk whole.
            return held + data if self.edits else data

    def _feed(self, data: bytes) -> bytes | list[bytes]:
        buf = self.pending + data
        end = data == b""
        if not end and self.alias is None and not _marked(buf, self.sse):
            return self._pass(buf, data)
        frames, self.pending = self._split(buf, end)
        if not self.edits:
            for frame, _ in frames:
                self._look(frame)
            return data
        out = []
        for frame, sep in frames:
            edited = self._look(frame)
            if edited is not None:
                out.append(edited + sep)
        # An empty list sends nothing now; b"" here would end the response early.
        return out if out or not end else b""

    def _pass(self, buf: bytes, data: bytes) -> bytes | list[bytes]:
        """What _feed sends for bytes in which no frame is worth reading and nothing is
        renamed (most chunks of a stream), without taking the frames apart: the same
        bytes, and the same unfinished frame at the end held back for the next chunk,
        which may complete it into one worth reading."""
        cut = _frames_end(buf, self.sse)
        self.pending = buf[cut:]
        if cut:
            # Every frame completed here is content (no end marker, usage or error is
            # among them): NDJSON lines, or SSE events with their "data:" line.
            if self.sse:
                self.tally.frames += buf.count(b"\ndata:", 0, cut) + buf.startswith(b"data:")
            else:
                self.tally.frames += buf.count(b"\n", 0, cut)
        if not self.edits:
            return data
        return buf[:cut] if cut else []  # (b"" would end the response)

    def _split(self, buf: bytes, end: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
        frames = []
        if self.sse:
            pos = 0
            for m in _SSE_SEP.finditer(buf):
                frames.append((buf[pos:m.start()], m.group()))
                pos = m.end()
            rest = buf[pos:]
        else:
            *lines, rest = buf.split(b"\n")
            frames = [(line, b"\n") for line in lines]
        if end and rest.strip():
            frames.append((rest, b""))
            rest = b""
        return frames, rest

    def _look(self, frame: bytes) -> bytes | None:
        """Observe one frame; return it (edited if need be), or None to drop it."""
        if self.sse:
            return self._look_event(frame)
        line = frame.strip()
        if not line:
            return frame
        interesting = _NATIVE_END.search(line) is not None
        if not interesting:
            self.tally.frames += 1  # content (the end, an error, a pull's end are not)
            if not self.edits:
                return frame
        doc = json.loads(line)
        if not isinstance(doc, dict):
            return frame
        if interesting and doc.get("done") is False:
            self.tally.frames += 1  # content whose text looks like a marker
        self._observe(doc)
        if self.alias and rename_model(doc, *self.alias):
            return dumps(doc)
        return frame

    def _look_event(self, frame: bytes) -> bytes | None:
        event, data_lines, other = None, [], []
        for line in frame.splitlines():
            if line.startswith(b"data:"):
                data_lines.append(line[5:].lstrip(b" "))
            else:
                if line.startswith(b"event:"):
                    event = line[6:].strip()
                other.append(line)
        if not data_lines:
            return frame
        data = b"\n".join(data_lines)
        if data.strip() == b"[DONE]":
            self.tally.finished = True
            return frame
        interesting = (
            event in (b"message_start", b"message_delta", b"message_stop", b"response.completed",
                      b"response.failed", b"error")
            or b'"usage"' in data or b'"error"' in data)
        if event is not None:
            if _content_event(event):
                self.tally.frames += 1
        elif not interesting:
            self.tally.frames += 1  # an OpenAI chunk: content (the last one holds none)
        # Taking out usage touches only frames that carry it; only a model alias needs
        # every frame parsed (the name is in each chunk).
        if not interesting and self.alias is None:
            return frame
        doc = json.loads(data)
        if not isinstance(doc, dict):
            return frame
        if (event is None and interesting and doc.get("choices")
                and doc.get("error") is None):
            self.tally.frames += 1  # a chunk with content that also carries usage
        self._observe(doc, event)
        changed = bool(self.alias and rename_model(doc, *self.alias))
        if self.strip_usage and "usage" in doc:
            if doc.get("choices") == []:
                return None  # the usage-only chunk the client did not ask for
            del doc["usage"]
            changed = True
        if not changed:
            return frame
        return b"\n".join([*other, b"data: " + dumps(doc)])

    def _observe(self, doc: dict, event: bytes | None = None) -> None:
        top_level_error = doc.get("error") is not None and self.api != "anthropic"
        if (top_level_error or doc.get("type") == "error"
                or event in (b"error", b"response.failed")):
            self.tally.upstream_error = True
            return
        read_usage(self.api, doc, self.tally)
        if (doc.get("done") is True or doc.get("status") == "success"
                or event in (b"message_stop", b"response.completed")):
            self.tally.finished = True


class Meter:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tallies: dict[str, TokenCounts] = {}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not state_of(flow).admitted or flow.response is None:
            return
        ctype = (get_field(flow.response.headers, b"content-type") or "").split(";")[0]
        ctype = ctype.strip().lower()
        if ctype not in STREAM_TYPES:
            return  # read whole in the response hook
        ep = endpoints.classify(flow.request.method, endpoints.client_path(flow))
        tally = TokenCounts()
        self.tallies[flow.id] = tally
        state_of(flow).stream = True
        flow.response.stream = StreamMeter(
            api=ep.api if ep else "ollama",
            sse=ctype == "text/event-stream",
            tally=tally,
            alias=_alias(flow),
            strip_usage=bool(state_of(flow).strip_usage),
        )

    def response(self, flow: http.HTTPFlow) -> None:
        if not state_of(flow).admitted or flow.response is None:
            return
        tally = self.tallies.pop(flow.id, None)
        if tally is None:
            state_of(flow).stream = False
            tally = self._read_body(flow)
        self._publish(flow, tally)
        self._price(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        tally = self.tallies.pop(flow.id, None)
        if tally is not None:
            self._publish(flow, tally)
            self._price(flow)

    def _price(self, flow: http.HTTPFlow) -> None:
        # Once the tokens are known: the stages after this one (the Limiter's shared
        # counters) see the cost the usage line will carry (docs/usage-log.md#cost).
        if self.config.state is not None:
            set_cost(flow, self.config.state.settings.prices)

    @staticmethod
    def _publish(flow: http.HTTPFlow, tally: TokenCounts) -> None:
        st = state_of(flow)
        completion = tally.completion_tokens
        estimated = tally.estimate() and _inference(flow)
        if estimated:
            # The counts never came: what went out counts, at least a token a frame.
            completion = tally.frames
            st.tokens_estimated = True
        st.prompt_tokens = tally.prompt_tokens
        st.cached_tokens = tally.cached_tokens
        st.completion_tokens = completion
        st.total_tokens = (tally.total_tokens if tally.total_tokens and not estimated
                           else tally.prompt_tokens + completion)
        st.finished = tally.finished
        if tally.upstream_error:
            st.error = "upstream_error"

    def _read_body(self, flow: http.HTTPFlow) -> TokenCounts:
        tally = TokenCounts(finished=True)
        resp = flow.response
        ctype = get_field(resp.headers, b"content-type") or ""
        if "json" not in ctype or not resp.raw_content:
            return tally
        ep = endpoints.classify(flow.request.method, endpoints.client_path(flow))
        if ep is None:
            return tally
        try:
            doc = json.loads(decoded_body(resp))
        except (ValueError, UnicodeDecodeError, RecursionError):
            # (An exception escaping here would skip the Limiter and the Recorder: no usage line.)
            if resp.status_code < 400:
                self._garbage(flow)
            return tally
        if not isinstance(doc, dict):
            return tally
        changed = False
        if resp.status_code < 400:
            read_usage(ep.api, doc, tally)
            alias = _alias(flow)
            if alias:
                changed = rename_model(doc, *alias)
            if ep.kind == "list":
                changed = self._filter_list(flow, doc) or changed
            elif ep.path == "/api/ps":
                changed = self._filter_running(flow, doc) or changed
        if changed:
            resp.content = dumps(doc)
        return tally

    @staticmethod
    def _garbage(flow: http.HTTPFlow) -> None:
        """A success whose JSON does not parse is garbage (docs/errors.md: 502 upstream_error), not
        a success without counts; nor may a model list go out unfiltered."""
        old = flow.response
        flow.response = make_error(flow, "upstream_error",
                                   "The upstream answered with a body that is not valid JSON.")
        for name, value in old.headers.items(multi=True):
            if name.lower().startswith("access-control-") or name.lower() == "vary":
                flow.response.headers.add(name, value)  # Cors has been; keep what it set

    def _filter_running(self, flow: http.HTTPFlow, doc: dict) -> bool:
        """/api/ps shows only what the key may use, like /api/tags (docs/endpoints.md)."""
        state = self.config.state
        channels = state.settings.channels
        name = state_of(flow).channel
        channel = next((c for c in channels if c.name == name), None) if name else None
        return filter_running(doc, state.keys.by_name.get(state_of(flow).key),
                              channel, channels)

    def _filter_list(self, flow: http.HTTPFlow, doc: dict) -> bool:
        """Model lists show only what the key may use (docs/endpoints.md)."""
        state = self.config.state
        key = state.keys.by_name.get(state_of(flow).key)
        channels = state.settings.channels

        def visible(name: object) -> bool:
            if not isinstance(name, str) or key is None or not key.may_use(name):
                return False
            return cloud_allowed(name, channels)

        if isinstance(doc.get("models"), list):
            doc["models"] = [m for m in doc["models"] if isinstance(m, dict)
                             and visible(m.get("name") or m.get("model"))]
            return True
        if isinstance(doc.get("data"), list):
            doc["data"] = [m for m in doc["data"] if isinstance(m, dict) and visible(m.get("id"))]
            return True
        return False


def _inference(flow: http.HTTPFlow) -> bool:
    """Whether the flow generates tokens (a pull's progress stream counts none)."""
    ep = endpoints.classify(flow.request.method, endpoints.client_path(flow))
    return ep is not None and ep.kind == "inference"


def _alias(flow: http.HTTPFlow) -> tuple[str, str] | None:
    model = state_of(flow).model
    upstream = state_of(flow).upstream_model
    if model and upstream and model != upstream:
        return (upstream, model)
    return None
