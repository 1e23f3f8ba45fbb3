"""The `Metrics` stage: `GET /metrics` in Prometheus' text format, for keys with the
`metrics` scope (docs/endpoints.md#metrics).

Nothing is counted in the request's hooks: the Recorder hands every finished request's
usage record to `observe` (the same record the usage log gets, so every counter here
equals what the log says), and the few gauges of keygate's state (requests in flight,
channel health, the usage log's backlog, config reloads) are read from the stages that
keep them, once a second and at each scrape. The cost per request is a few dictionary
lookups and increments (docs/performance.md#metrics).

Label values are bounded: `key` is a key name of keys.yaml ("" for none, "other" for a
name no longer there), `channel` a channel of gateway.toml ("" for none), `model` one of
the first MAX_MODELS names that were served successfully ("" for none, "other" for the
rest), `code` keygate's error code ("" for none).

With several workers (`keygate serve --workers N`) the environment variable
PROMETHEUS_MULTIPROC_DIR names a folder the workers share: prometheus-client then keeps
every value in a file there, and a scrape of any worker sums them all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable
from typing import Any

from mitmproxy import ctx, http
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.request import state_of

log = logging.getLogger("keygate")

# No `*_created` series beside every counter: they double the text a scrape carries.
disable_created_metrics()

MAX_MODELS = 100
REFRESH = 1.0  # seconds between readings of the gauges
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    float("inf"))
FIRST_BYTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                      30, float("inf"))

# The limit a 429 names, from keygate's own message (keygate/stages/limiter.py).
_LIMITS = (
    ("in flight for this key", "concurrent"),
    ("requests per minute", "rpm"),
    ("nearly used up", "reserved"),
    ("tokens per minute", "tpm"),
    ("Daily request quota", "requests_per_day"),
    ("Daily token quota", "tokens_per_day"),
    ("Monthly request quota", "requests_per_month"),
    ("Monthly token quota", "tokens_per_month"),
    ("tokens in total", "tokens_total"),
    ("budget", "budget"),
)


def limit_of(message: str) -> str:
    """The limit a refusal's message names: one of the names of docs/limits.md, "reserved"
    for tokens held by requests in flight, "other" for anything else."""
    low = message.lower()
    for needle, name in _LIMITS:
        if needle.lower() in low:
            if name == "budget":
                for period in ("day", "month", "total"):
                    if period in low:
                        return f"budget_per_{period}" if period != "total" else "budget_total"
            return name
    return "other"


def error_message(body: bytes | None) -> str:
    """The message of one of keygate's error bodies, in any of its shapes (docs/errors.md)."""
    try:
        doc = json.loads(body or b"")
    except ValueError:
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return err if isinstance(err, str) else ""


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir") or None


class Metrics:
    """See the module docstring. `recorder` (in_flight, writer), `router` (health) and
    `config` (reload counts) are read, never changed."""

    def __init__(self, config, recorder, router) -> None:
        self.config = config
        self.recorder = recorder
        self.router = router
        self.multiproc = multiprocess_dir()
        # Single process: a registry of its own (a reloaded gateway.py starts one afresh).
        # Several: values live in the shared folder's files; the scrape reads them all.
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiproc else self.registry
        self.requests = Counter(
            "keygate_requests", "Requests that ended, by key, model, channel, status and "
            "keygate error code (one per usage-log line)",
            ("key", "model", "channel", "status", "code"), registry=reg)
        self.tokens = Counter(
            "keygate_tokens", "Tokens, by key, model and kind (prompt, completion)",
            ("key", "model", "kind"), registry=reg)
        self.cost = Counter(
            "keygate_cost", "Money spent at the prices in force, by key and model",
            ("key", "model"), registry=reg)
        self.duration = Histogram(
            "keygate_request_duration_seconds", "Start of request to end of response, "
            "by channel", ("channel",), buckets=DURATION_BUCKETS, registry=reg)
        self.first_byte = Histogram(
            "keygate_stream_first_byte_seconds", "Streamed responses: start of request to "
            "the response headers, by channel", ("channel",), buckets=FIRST_BYTE_BUCKETS,
            registry=reg)
        self.refusals = Counter(
            "keygate_limit_refusals", "Requests refused by a limit or quota (429), by key "
            "and limit", ("key", "limit"), registry=reg)
        self.in_flight = Gauge(
            "keygate_requests_in_flight", "Requests in flight", registry=reg,
            multiprocess_mode="livesum")
        self.channel_up = Gauge(
            "keygate_channel_up", "1 while a channel is healthy, 0 while it cools down "
            "after failures", ("channel",), registry=reg, multiprocess_mode="livemin")
        self.reloads = Counter(
            "keygate_config_reloads", "Reloads of gateway.toml and keys.yaml, by result",
            ("result",), registry=reg)
        self.reload_time = Gauge(
            "keygate_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was read (Unix time)", registry=reg,
            multiprocess_mode="max")
        self.backlog = Gauge(
            "keygate_usage_log_backlog", "Usage records not yet written to the log",
            registry=reg, multiprocess_mode="livesum")
        self.write_errors = Counter(
            "keygate_usage_log_write_errors", "Failed writes of the usage log",
            registry=reg)
        self.dropped = Counter(
            "keygate_usage_log_dropped", "Usage records lost because the backlog was full",
            registry=reg)
        self._children: dict[tuple, Any] = {}
        self._models: set[str] = set()
        self._seen = {"success": 0, "failure": 0, "write_errors": 0, "dropped": 0}
        self._channels: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None

    # ---- lifecycle

    def running(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(REFRESH, self._tick, loop)

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        master = getattr(ctx, "master", None)
        if master is not None and master.should_exit.is_set():
            self.stopped()  # (a reload of gateway.py is not a stop: the process goes on)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.refresh()
        except Exception:  # a reading that failed must not stop the next ones
            log.exception("keygate: metrics: reading the gauges failed")
        self._timer = loop.call_later(REFRESH, self._tick, loop)

    # ---- what the Recorder hands over

    def observe(self, record: dict, flow: http.HTTPFlow | None = None) -> None:
        """Count one finished request from its usage record (keygate/stages/recorder.py)."""
        state = self.config.state
        if state is None or not state.settings.metrics:
            return
        key = record["key"]
        if key is None:
            key = ""
        elif key not in state.keys.by_name:
            key = "other"
        model = self._model(record)
        channel = record["channel"] or ""
        status = record["status"]
        code = record["error"] or ""
        children = self._children
        ident = (key, model, channel, status, code)
        c = children.get(ident)
        if c is None:
            c = children[ident] = self.requests.labels(key, model, channel, str(status), code)
        c.inc()
        prompt, completion = record["prompt_tokens"], record["completion_tokens"]
        if prompt or completion:
            ident = (key, model)
            pair = children.get(ident)
            if pair is None:
                pair = children[ident] = (self.tokens.labels(key, model, "prompt"),
                                          self.tokens.labels(key, model, "completion"))
            if prompt:
                pair[0].inc(prompt)
            if completion:
                pair[1].inc(completion)
        cost = record.get("cost")
        if cost is not None and not isinstance(cost, bool):
            try:
                amount = float(cost)
            except (TypeError, ValueError):
                amount = None
            if amount is not None:
                ident = ("c", key, model)
                child = children.get(ident)
                if child is None:
                    child = children[ident] = self.cost.labels(key, model)
                child.inc(amount)
        if code in ("rate_limit_exceeded", "insufficient_quota"):
            message = error_message(flow.response.raw_content) if (
                flow is not None and flow.response is not None) else ""
            ident = ("r", key, limit_of(message))
            child = children.get(ident)
            if child is None:
                child = children[ident] = self.refusals.labels(key, ident[2])
            child.inc()
        ident = ("d", channel)
        h = children.get(ident)
        if h is None:
            h = children[ident] = self.duration.labels(channel)
        h.observe(record["duration_ms"] / 1000.0)
        if record["stream"] and flow is not None and flow.response is not None:
            start = flow.request.timestamp_start
            first = flow.response.timestamp_start
            if start and first and first >= start:
                ident = ("f", channel)
                h = children.get(ident)
                if h is None:
                    h = children[ident] = self.first_byte.labels(channel)
                h.observe(first - start)
        if len(children) > 100_000:
            children.clear()  # (the metrics keep their values; only the shortcuts go)

    def _model(self, record: dict) -> str:
        model = record["model"]
        if model is None:
            return ""
        if model in self._models:
            return model
        if (len(self._models) < MAX_MODELS and record["status"] < 400
                and record["error"] is None and type(model) is str):
            self._models.add(model)
            return model
        return "other"

    # ---- gauges, read from the stages that keep them

    def refresh(self) -> None:
        self.in_flight.set(self.recorder.in_flight)
        writer = self.recorder.writer
        if writer is not None:
            self.backlog.set(writer.backlog)
            self._count("write_errors", writer.write_errors, self.write_errors)
            self._count("dropped", writer.dropped_total, self.dropped)
        cfg = self.config
        self._count("success", getattr(cfg, "reloads", 0), self.reloads.labels("success"))
        self._count("failure", getattr(cfg, "reload_failures", 0),
                    self.reloads.labels("failure"))
        loaded = getattr(cfg, "loaded_at", None)
        if loaded:
            self.reload_time.set(loaded)
        if cfg.state is not None:
            health = self.router.health
            names = {c.name for c in cfg.state.settings.channels}
            for name in names:
                self.channel_up.labels(name).set(0 if health.cooling(name) else 1)
            for gone in self._channels - names:
                try:
                    self.channel_up.remove(gone)
                except KeyError:
                    pass
            self._channels = names

    def _count(self, name: str, now: int, counter) -> None:
        """Add to a counter what a stage's own running count grew by since last time."""
        delta = now - self._seen[name]
        if delta > 0:
            counter.inc(delta)
        self._seen[name] = now

    # ---- GET /metrics

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return None
        if state_of(flow).path != "/metrics":
            return None
        ep = endpoints.classify_request(flow)
        if ep is None or ep.kind != "metrics":
            return None
        if not self.config.state.settings.metrics:
            refuse(flow, "unknown_endpoint",
                   "Metrics are off on this gateway ([gateway] metrics = false).")
            return None
        return self._answer(flow)

    async def _answer(self, flow: http.HTTPFlow) -> None:
        self.refresh()
        body = await asyncio.to_thread(self.render)
        if flow.response or flow.error or not flow.live:
            return
        flow.response = http.Response.make(200, body, {"content-type": CONTENT_TYPE_LATEST,
                                                       "cache-control": "no-store"})

    def render(self) -> bytes:
        """The text exposition of every metric (of every worker, in multiprocess mode)."""
        if self.multiproc:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiproc)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def stopped(self) -> None:
        """This worker is gone for good: its live gauges no longer count (multiprocess)."""
        if self.multiproc:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiproc)
