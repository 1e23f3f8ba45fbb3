"""keygate: API keys, per-key policy, model routing and usage accounting for Ollama and
OpenAI-compatible servers, as mitmproxy addons.

    mitmdump --mode reverse:http://127.0.0.1:11434 --listen-port 3000 -s addons/gateway.py \
        --set keygate_config=config/gateway.toml

(`scripts/serve` runs exactly that, with the settings keygate wants.) This file only lists
the addons in hook order; each lives in its own module of the keygate package beside it.
mitmproxy sees them as one addon, a `Pipeline` that calls them in this order (one hook
lookup per event instead of one per addon: keygate/stages/pipeline.py). The modules load once per
process: after editing them, restart mitmdump.
"""

from keygate.edge import http1 as wire
from keygate.edge import redact, upstream
from keygate.stages import failclosed
from keygate.stages.auth import Auth
from keygate.stages.catalog import Catalog
from keygate.stages.config import Config
from keygate.stages.cors import Cors
from keygate.stages.deadlines import Deadlines
from keygate.stages.limiter import Limiter
from keygate.stages.metering import Meter
from keygate.stages.metrics import Metrics
from keygate.stages.pages import Pages
from keygate.stages.pipeline import Pipeline
from keygate.stages.policy import Policy
from keygate.stages.recorder import Recorder, new_request_id
from keygate.stages.routing import Router
from keygate.stages.shared import Shared

config = Config()
router = Router(config)
usage = Recorder(config)
shared = Shared(config)  # redis_url: limits shared by every keygate process (its .reachable)
metrics = Metrics(config, usage, router)  # GET /metrics, counted from each usage record
own_pages = Pages(config, usage, router)  # /keygate/*, the usage page, billing, health
usage.observers += [metrics.observe, own_pages.observe, shared.observe]
own_pages.shared = shared  # redis_url: /keygate/usage shows every instance's totals
own_pages.checks["redis"] = lambda: shared.reachable  # readiness: Redis, when configured

stages = [
    config,  # gateway.toml and keys.yaml, reloaded when they change
    Deadlines(config),  # slow clients: request head and body deadlines close the connection
    Cors(config),  # preflight answers and CORS headers for cors_origins
    Auth(config),  # client address and API key -> key name
    Policy(config),  # endpoint table, scopes, body checks, model permissions
    metrics,  # GET /metrics (metrics scope)
    own_pages,  # keygate's own endpoints: health, dashboard, usage, me, billing
    Catalog(config, router),  # model lists merged over channels, answered by keygate
    router,  # channel choice, upstream rewrite, upstream credential
    Meter(config),  # token counts and model names in responses, streamed or not
    Limiter(config, usage, shared=shared),  # rpm, tpm, concurrency, daily and total quotas
    usage,  # request ids and the usage log
    shared,  # redis_url: the connection to Redis (after usage: closed after its drain)
]

# After the stages, even when one raised: refuse what they did not let through.
addons = [Pipeline(stages, last=[failclosed.LastStage()])]

# Outside the pipeline on purpose: they must survive a broken reload of this file.
redact.install()  # no request bytes (keys) in mitmproxy's own log lines
wire.install(  # head size, folded lines, keygate's answers where mitmproxy answers alone
    max_head=lambda: (config.state.settings.max_header_bytes if config.state
                      else wire.DEFAULT_MAX_HEAD),
    max_body=lambda: (config.state.settings.max_body_bytes if config.state
                      else wire.DEFAULT_MAX_BODY),
    new_request_id=new_request_id,
    report=usage.edge_refusal,  # their usage lines
)
upstream.install(failover=router.failover)  # failed upstream: another channel, or 502/504
