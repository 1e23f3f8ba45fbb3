"""Limits shared by every keygate process through Redis (docs/shared-state.md).

With `[gateway] redis_url` set, each decision of the Limiter about a key with limits is
one Lua script in Redis, so any number of keygate processes, on any number of machines,
enforce one set of counters with the semantics of one process (docs/limits.md):

- admission (`ADMIT`): drops the leases that ran out, checks concurrent, rpm, tpm and the
  quotas in the Limiter's order, and only if all pass counts the request (in flight with a
  lease, its reservation, its rpm event, its request in each period) -- atomically, so no
  two processes can both take the last unit of a limit;
- settlement (`SETTLE`): the request's real tokens (and any other amount, such as money)
  replace its reservation, in the tpm window and in each period.

Both are sent with EVALSHA, and every script call waiting in the same turn of the event
loop goes out in one pipeline: at most one round trip for an admission and one for a
settlement, shared by every request that needs one at that moment. The calls are awaited
(redis-py's asyncio client, a short timeout each): the event loop never blocks.

Per key K (the `{K}` hash tag keeps a key's counters on one Redis Cluster slot):

    keygate:{K}:fl        sorted set: requests in flight, scored by lease expiry (ms)
    keygate:{K}:rs        hash: request id -> its reservation ("x": its lease lapsed)
    keygate:{K}:rsn       the reservations in flight, summed
    keygate:{K}:lp        sorted set: lapsed requests (a late settlement still counts)
    keygate:{K}:rq        sorted set: admissions of the last 60 s (rpm)
    keygate:{K}:tk, tkn   sorted set of "id:tokens" of the last 60 s, and their sum (tpm)
    keygate:{K}:d:DAY     hash r, t (and other amounts): requests and tokens of a UTC day
    keygate:{K}:m:MONTH   the same for a UTC month
    keygate:{K}:all       the same for the key's lifetime

A request counts in its periods from admission (r) and when it ends (t): `r` includes the
requests in flight, as the one-process check `requests_on(day) + in flight` does. The
periods are those of the request's start, as in its usage line.

A process that dies stops renewing the leases of its requests (LEASE_MS, renewed every
RENEW_S while they run): within LEASE_MS they no longer count as in flight, and their
reservations are released. A settlement that comes after its lease lapsed (Redis was
unreachable meanwhile) still counts its tokens once: the request's entry stays, marked,
for LAPSED_KEEP_MS. A settlement is applied at most once (its entry in `rs` is the mark);
a settlement that could not be sent is kept (up to PENDING_LIMIT) and sent again once
Redis answers.

Hourly totals (`HOURLY`, docs/shared-state.md#usage-totals-of-every-instance): each
finished request's record adds to the hash of its UTC hour, `keygate:h:YYYY-MM-DDTHH`, the
same counters accounting/hourly.py keeps per group (key, model, channel, status, error) and
the duration histogram bucket of its channel. The records of one turn of the event loop
are summed per hour and go out in the same pipeline as the settlements, one call per hour.
Fields: a letter (r requests, p prompt, q completion, t total tokens, c cost, l latency)
then the group as a JSON array, so no client string can make two groups one. Money is
added as decimal strings by the script (exact, as Decimal does): no float ever rounds it.
`/keygate/usage` reads the hours of its period back (`read_hours`, one pipeline).

Failure: a call that fails or times out marks Redis unreachable; a probe then tries it
every PROBE_S and the first answer brings normal service back. Meanwhile admissions are
not sent at all: the Limiter refuses them (redis_failure = "closed") or counts them in
the process ("local"); requests admitted locally are added to Redis' periods once it
answers again, so the day and total counters still say what was admitted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from keygate.accounting.hourly import MAX_MODELS, OTHER_MODEL, Hourly, bucket_of
from keygate.accounting.ledger import REFUSED
from keygate.accounting.totals import group_text, record_ts
from keygate.model.prices import MONEY, money_text, to_decimal

log = logging.getLogger("keygate")

PREFIX = "keygate:"
MARKER = PREFIX + "counters"  # set once the periods hold what the logs say (restore)
# When the first keygate process found Redis without MARKER (ms): what Redis counted from
# then on is its own, the rebuild from the logs (accounting/restore.py) adds what was before.
BACK = PREFIX + "counters-lost"
BACK_MS = 600_000
LEASE_MS = 30_000
RENEW_S = 10.0
LAPSED_KEEP_MS = 3_600_000
CALL_TIMEOUT_S = 1.0  # one pipeline, admission or settlement
CONNECT_TIMEOUT_S = 2.0
# Pipelines in flight at once, at most (one connection each); the calls of later turns
# wait for one to be answered and go out together in the next.
PIPELINES = 4
PROBE_S = 0.5
WARN_EVERY_S = 60.0
PENDING_LIMIT = 100_000
DAY_TTL_MS = 3 * 86_400_000  # a day's counters outlive it: a late settlement still lands
MONTH_TTL_MS = 63 * 86_400_000

HOURS = PREFIX + "h:"  # + "YYYY-MM-DDTHH": the hourly totals of every instance
HOUR_TTL_MS = 400 * 86_400_000  # accounting/hourly.py's RETENTION_DAYS after the last write
READ_TIMEOUT_S = 5.0  # reading a period's hours (up to 366 days of them) for /keygate/usage

# Verdicts of ADMIT: {0, rpm used, tpm used} admits; else what refused it.
ADMITTED, CONCURRENT, RPM, TPM, USED_UP, HELD = 0, 1, 2, 3, 4, 5

_EXPIRE_LEASES = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  for _, g in ipairs(gone) do
    local r = redis.call('HGET', KEYS[2], g)
    if r and r ~= 'x' then
      if tonumber(r) > 0 then redis.call('DECRBY', KEYS[3], r) end
      redis.call('HSET', KEYS[2], g, 'x')
      redis.call('ZADD', KEYS[4], now, g)
    end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - %(keep)d)
  for _, g in ipairs(old) do redis.call('HDEL', KEYS[2], g) end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - %(keep)d)
end
""" % {"keep": LAPSED_KEEP_MS}

# KEYS: fl rs rsn lp rq tk tkn, then the periods. ARGV: now id lease reserve rpm tpm
# concurrent nperiods, a TTL per period, then the quota checks as (period index, field,
# limit, reservations count 1/0) each. -1: no such limit.
ADMIT = """
local now = tonumber(ARGV[1])
local id, lease, reserve = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rpm, tpm, conc = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local np = tonumber(ARGV[8])
""" + _EXPIRE_LEASES + """
if conc >= 0 and redis.call('ZCARD', KEYS[1]) >= conc then return {1} end
local rcount = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 60000)
  rcount = redis.call('ZCARD', KEYS[5])
  if rcount >= rpm then
    local wait = 60000
    if rpm > 0 then
      local e = redis.call('ZRANGE', KEYS[5], rcount - rpm, rcount - rpm, 'WITHSCORES')
      wait = tonumber(e[2]) + 60000 - now
    end
    return {2, wait}
  end
end
local reserved = tonumber(redis.call('GET', KEYS[3]) or '0')
local ttotal, held = 0, -1
if tpm >= 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now - 60000)
  if #old > 0 then
    local sub = 0
    for _, m in ipairs(old) do sub = sub + tonumber(string.match(m, ':(%d+)$')) end
    redis.call('DECRBY', KEYS[7], sub)
    redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - 60000)
  end
  ttotal = math.max(0, tonumber(redis.call('GET', KEYS[7]) or '0'))
  if ttotal >= tpm then
    local ev = redis.call('ZRANGE', KEYS[6], 0, -1, 'WITHSCORES')
    local t, wait = ttotal, 60000
    for i = 1, #ev, 2 do
      t = t - tonumber(string.match(ev[i], ':(%d+)$'))
      if t < tpm then wait = tonumber(ev[i + 1]) + 60000 - now; break end
    end
    return {3, wait}
  end
  if reserved > 0 and ttotal + reserved >= tpm then held = 0 end
end
local i, idx = 9 + np, 0
while i + 3 <= #ARGV do
  idx = idx + 1
  local used = tonumber(redis.call('HGET', KEYS[7 + tonumber(ARGV[i])], ARGV[i + 1]) or '0')
  local limit = tonumber(ARGV[i + 2])
  if used >= limit then return {4, idx} end
  if ARGV[i + 3] == '1' and reserved > 0 and held < 0 and used + reserved >= limit then
    held = idx
  end
  i = i + 4
end
if held >= 0 then return {5, held} end
redis.call('ZADD', KEYS[1], now + lease, id)
redis.call('HSET', KEYS[2], id, reserve)
if reserve > 0 then redis.call('INCRBY', KEYS[3], reserve) end
if rpm >= 0 then
  redis.call('ZADD', KEYS[5], now, id)
  redis.call('PEXPIRE', KEYS[5], 61000)
  rcount = rcount + 1
end
for p = 1, np do
  redis.call('HINCRBY', KEYS[7 + p], 'r', 1)
  local ttl = tonumber(ARGV[8 + p])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[7 + p], ttl) end
end
return {0, rcount, ttotal}
"""

# KEYS: fl rs rsn lp tk tkn, then the periods (then, for "l", rq). ARGV: now id tokens
# in_tpm mode nperiods, a TTL per period, then (field, amount) pairs added to every period.
# mode "a": admitted through ADMIT; "l" followed by its start (ms): admitted by a process
# while Redis was unreachable (counts r too, and joins the rpm window at its start when rq
# is given).
SETTLE = """
local now, id, tokens = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local np = tonumber(ARGV[6])
local mode = string.sub(ARGV[5], 1, 1)
if mode ~= 'l' then
  local r = redis.call('HGET', KEYS[2], id)
  if not r then return 0 end
  redis.call('HDEL', KEYS[2], id)
  if r == 'x' then
    redis.call('ZREM', KEYS[4], id)
  else
    redis.call('ZREM', KEYS[1], id)
    if tonumber(r) > 0 then
      if redis.call('DECRBY', KEYS[3], r) <= 0 then redis.call('DEL', KEYS[3]) end
    end
  end
end
if tokens > 0 and ARGV[4] == '1' then
  redis.call('ZADD', KEYS[5], now, id .. ':' .. tokens)
  redis.call('INCRBY', KEYS[6], tokens)
  redis.call('PEXPIRE', KEYS[5], 61000)
  redis.call('PEXPIRE', KEYS[6], 61000)
end
local started = tonumber(string.sub(ARGV[5], 2))
if mode == 'l' and started and #KEYS > 6 + np then
  local rq = KEYS[7 + np]
  redis.call('ZADD', rq, started, id)
  redis.call('PEXPIRE', rq, 61000)
end
for p = 1, np do
  local key = KEYS[6 + p]
  if tokens > 0 then redis.call('HINCRBY', key, 't', tokens) end
  if mode == 'l' then redis.call('HINCRBY', key, 'r', 1) end
  local i = 7 + np
  while i + 1 <= #ARGV do
    redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  local ttl = tonumber(ARGV[6 + p])
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
return 1
"""

# KEYS: an hour's hash. ARGV: its TTL, then (op, field, amount) triples: op "i" adds an
# integer (HINCRBY), "d" a non-negative decimal string, digit by digit (exact: money).
HOURLY = """
local function dadd(a, b)
  local ai, af = string.match(a, '^(%d+)%.?(%d*)$')
  local bi, bf = string.match(b, '^(%d+)%.?(%d*)$')
  if not ai then return b end
  if not bi then return a end
  local fl = math.max(#af, #bf)
  af = af .. string.rep('0', fl - #af)
  bf = bf .. string.rep('0', fl - #bf)
  local il = math.max(#ai, #bi)
  local x = string.rep('0', il - #ai) .. ai .. af
  local y = string.rep('0', il - #bi) .. bi .. bf
  local d, carry = {}, 0
  for k = #x, 1, -1 do
    local s = string.byte(x, k) + string.byte(y, k) - 96 + carry
    if s >= 10 then s = s - 10; carry = 1 else carry = 0 end
    d[k] = string.char(48 + s)
  end
  local s = table.concat(d)
  if carry == 1 then s = '1' .. s end
  local int = (string.gsub(string.sub(s, 1, #s - fl), '^0+', ''))
  local frac = (string.gsub(string.sub(s, #s - fl + 1), '0+$', ''))
  if int == '' then int = '0' end
  if frac == '' then return int end
  return int .. '.' .. frac
end
local h = KEYS[1]
local i = 2
while i + 2 <= #ARGV do
  if ARGV[i] == 'i' then
    redis.call('HINCRBY', h, ARGV[i + 1], ARGV[i + 2])
  else
    local old = redis.call('HGET', h, ARGV[i + 1])
    if old then redis.call('HSET', h, ARGV[i + 1], dadd(old, ARGV[i + 2]))
    else redis.call('HSET', h, ARGV[i + 1], ARGV[i + 2]) end
  end
  i = i + 3
end
redis.call('PEXPIRE', h, ARGV[1])
return 1
"""

# Renewal of this process's leases: ARGV expiry, then ids; KEYS[1] the key's fl.
RENEW = """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i]) end
return 1
"""


class Unavailable(Exception):
    """Redis did not answer in time, or refused: the caller applies redis_failure."""


def key_base(name: str) -> str:
    return f"{PREFIX}{{{name}}}:"


_PERIODS: dict[int, tuple[str, str]] = {}  # day number since the epoch -> periods_of


def _settle_keys(name: str, day: str, month: str) -> list[str]:
    """SETTLE's keys for a request of key `name` that started on `day`, in `month`."""
    base = key_base(name)
    return [base + "fl", base + "rs", base + "rsn", base + "lp", base + "tk", base + "tkn",
            f"{base}d:{day}", f"{base}m:{month}", base + "all"]


def periods_of(start: float) -> tuple[str, str]:
    """(UTC day "YYYY-MM-DD", UTC month "YYYY-MM") of a request that started at `start`."""
    n = int(start // 86400)
    periods = _PERIODS.get(n)
    if periods is None:
        if len(_PERIODS) >= 64:
            _PERIODS.clear()
        day = dt.datetime.fromtimestamp(n * 86400, dt.timezone.utc).date().isoformat()
        periods = _PERIODS[n] = (day, day[:7])
    return periods


@dataclass(frozen=True)
class Check:
    """One quota ADMIT checks: `field` of the period (0 day, 1 month, 2 lifetime) must be
    below `limit`; with `reserved`, the reservations in flight count too."""

    period: int
    field: str
    limit: int | float | str
    reserved: bool


@dataclass
class Verdict:
    kind: int  # ADMITTED, CONCURRENT, RPM, TPM, USED_UP, HELD
    wait: float | None = None  # seconds (RPM, TPM)
    check: int = 0  # which Check refused (USED_UP, HELD; 0 for HELD by tpm), from 1
    rpm_used: int = 0
    tpm_used: int = 0


class SharedCounters:
    """The connection to Redis and the two scripts; see the module docstring. One per
    process and Redis URL. `reachable` says whether Redis answered the last call."""

    def __init__(self, url: str, clock=time.time) -> None:
        import redis.asyncio as aioredis  # only a keygate with redis_url needs redis-py

        self.clock = clock
        self.redis = aioredis.from_url(
            url, socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            max_connections=64, health_check_interval=0)
        # The pipelines of admissions and settlements (`_pipeline`) have connections of
        # their own, kept here between pipelines rather than taken from and given back to
        # a pool each time, and without a timeout per reply: each pipeline as a whole has
        # CALL_TIMEOUT_S (`_send`). Per round trip, redis-py's pool and its timeout around
        # every reply cost more CPU than the rest of the round trip together.
        self._pool = aioredis.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=CONNECT_TIMEOUT_S,
            max_connections=PIPELINES, health_check_interval=0)
        self._idle: list = []  # connected, no reply pending
        # /keygate/usage reads (`read_hours`): a client of its own, used from a thread, so
        # parsing a year of hours never holds up the event loop. (The URL is kept by the
        # client only, never logged.)
        self._reader = None
        self._reader_url = url
        self._shas: dict[str, bytes] = {}
        self._batch: list[tuple[str, bytes, int, asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()
        self._parts: dict[tuple, tuple[bytes, bytes, int]] = {}
        self._settle_heads: dict[tuple[str, str], bytes] = {}
        self._reachable = True
        self._probe: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None
        self.leases: dict[str, str] = {}  # request id -> key name, admitted here
        # Settlements to send once Redis answers: (call, its nargs, its request's start).
        self.pending: list[tuple[bytes, int, float]] = []
        self._warned = 0.0
        self._warned_reply = -WARN_EVERY_S  # (the last "unexpected reply" error)
        self.round_trips = 0  # pipelines sent (the bench reports them per request)
        self.down_since: float | None = None
        self._back: bytes | None = None  # BACK, as this process found it set
        # Hourly totals: the records of this turn (`hour_item`s), those held while Redis
        # was unreachable (up to PENDING_LIMIT), and the model names kept apart (as
        # accounting/hourly.py caps them: the rest count as its OTHER_MODEL).
        self._items: list[tuple] = []
        self.pending_hours: list[tuple] = []
        self.models: set[str] = set()

    # ------------------------------------------------------------------ state

    @property
    def reachable(self) -> bool:
        """Whether Redis answered the last call (for /keygate/health/ready)."""
        return self._reachable

    def start(self, answered: bool = True) -> None:
        """Renew leases from now on; `answered`: whether Redis answered so far (if not,
        the probe starts at once)."""
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        if not answered:
            # (Not an error line: at start-up mitmdump exits on one.)
            self._lost(None)

    async def close(self) -> None:
        for task in (self._renewer, self._probe):
            if task is not None:
                task.cancel()
        self._renewer = self._probe = None
        self._flush()
        # The last settlements go out before the connections close.
        loop = asyncio.get_running_loop()
        until = loop.time() + CALL_TIMEOUT_S * 2
        while self._sending and loop.time() < until:
            await asyncio.wait(list(self._sending), timeout=until - loop.time())
        if self.pending and self._reachable:
            try:
                await asyncio.wait_for(self._send_pending(), CALL_TIMEOUT_S * 2)
            except Exception:
                pass
        self._idle.clear()
        for closing in (self._pool.disconnect(), self.redis.aclose()):
            try:
                await closing
            except Exception:  # closing a connection that already broke
                pass
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:
                pass
            self._reader = None

    def _lost(self, e: BaseException | None) -> None:
        """Redis did not answer (`e`; None at start-up, where it was said already)."""
        if self._reachable:
            self._reachable = False
            self.down_since = time.monotonic()
            if e is not None:
                log.error("keygate: Redis unreachable (%s); limits follow redis_failure until "
                          "it answers again", _describe(e))
            self._warned = time.monotonic()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    def warn_local(self) -> None:
        """A warning each minute while limits are counted in this process alone."""
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning("keygate: Redis still unreachable; limits are counted by this "
                        "process alone (redis_failure = \"local\")")

    async def _probe_loop(self) -> None:
        while not self._reachable:
            await asyncio.sleep(PROBE_S)
            try:
                await asyncio.wait_for(self.redis.ping(), CALL_TIMEOUT_S)
                await asyncio.wait_for(self._load_scripts(), CALL_TIMEOUT_S)
                kept = await asyncio.wait_for(self.mark_lost(), CALL_TIMEOUT_S)
            except Exception:
                continue
            await self._drop_idle()
            self._reachable = True
            log.info("keygate: Redis answers again (after %.1f s)",
                     time.monotonic() - (self.down_since or time.monotonic()))
            self.down_since = None
            if not kept and (self.pending or self.pending_hours):
                await self._after_rebuild()
            await self._send_pending()

    async def mark_lost(self) -> bool:
        """Whether Redis still has its counters (MARKER); if not, BACK is set to now
        unless another process did first."""
        if await self.redis.exists(MARKER):
            return True
        await self.redis.set(BACK, int(self.clock() * 1000), nx=True, px=BACK_MS)
        self._back = await self.redis.get(BACK)
        return False

    async def _after_rebuild(self) -> None:
        """Redis came back without its data: the counters are rebuilt from the logs, up to
        BACK (stages/shared.py does it, or another process). Of the settlements held
        meanwhile, those of requests that started before BACK are in the logs already;
        the others are sent once the rebuild is done."""
        back = self._back  # (the rebuild deletes BACK when it sets MARKER: read before)
        for _ in range(int(60 / PROBE_S)):
            if not self._reachable:
                return  # lost again: the probe starts over
            try:
                back = await asyncio.wait_for(self.redis.get(BACK), CALL_TIMEOUT_S) or back
                done = await asyncio.wait_for(self.redis.exists(MARKER), CALL_TIMEOUT_S)
            except Exception:
                return  # unreachable again: the next answer starts over
            if done:
                break
            await asyncio.sleep(PROBE_S)
        cut = int(back) / 1000 if back else self.clock()
        before = len(self.pending)
        self.pending = [p for p in self.pending if p[2] >= cut]
        since = _iso(cut)
        self.pending_hours = [i for i in self.pending_hours if i[0] >= since]
        log.warning("keygate: Redis lost its data; of the %d settlements held meanwhile, "
                    "%d are in the rebuild from the usage logs", before,
                    before - len(self.pending))

    async def _load_scripts(self) -> None:
        for name, text in (("admit", ADMIT), ("settle", SETTLE), ("renew", RENEW),
                           ("hourly", HOURLY)):
            sha = await self.redis.script_load(text)
            self._shas[name] = sha.encode() if isinstance(sha, str) else sha

    # ------------------------------------------------------------------ calls

    def _call(self, script: str, tail: bytes, nargs: int) -> asyncio.Future:
        """Queue one script call for the next pipeline (sent at the end of this turn of
        the event loop); its future gets the reply or an exception. `tail`: the call's
        numkeys, keys and arguments as RESP (`_pack`), `nargs` of them."""
        fut = asyncio.get_running_loop().create_future()
        self._batch.append((script, tail, nargs, fut))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        if len(self._sending) >= PIPELINES:
            return  # sent once a pipeline in flight is answered (`_sent`)
        if self._items:
            items, self._items = self._items, []
            loop = asyncio.get_running_loop()
            for tail, nargs, of_hour in hour_calls(items):
                fut = loop.create_future()
                fut.add_done_callback(lambda f, kept=of_hour: self._hours_sent(f, kept))
                self._batch.append(("hourly", tail, nargs, fut))
        batch, self._batch = self._batch, []
        if not batch:
            return
        if not self._reachable:  # (queued before the failure was seen: it fails now)
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(Unavailable("unreachable"))
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.discard(task)
        if self._batch or self._items:
            self._flush()

    async def _send(self, batch: list) -> None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                replies = await self._pipeline(batch)
        except Exception as e:
            self._lost(e)
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(Unavailable(_describe(e)))
            return
        for (*_, fut), reply in zip(batch, replies):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(Unavailable(_describe(reply)))
            else:
                fut.set_result(reply)

    async def _pipeline(self, batch: list) -> list:
        """Send the calls of `batch` in one write and read their replies: one round trip.
        The commands are packed here (`_pack`), not by redis-py's command layer, whose
        encoding of each argument was most of a call's cost; redis-py keeps the
        connections, the authentication and the reply parser (hiredis when installed).
        The caller bounds the whole in time (`_send`)."""
        from redis.exceptions import NoScriptError, ResponseError

        if not self._shas:
            await self._load_scripts()
        conn = None
        while self._idle:
            conn = self._idle.pop()
            if _open(conn):
                break
            await self._drop(conn)  # Redis closed it while it waited here
            conn = None
        if conn is None:
            try:
                conn = await self._pool.get_connection()
            except TypeError:  # redis-py before 5.3 wants a command name
                conn = await self._pool.get_connection("EVALSHA")
        try:
            data = b"".join(
                b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (
                    nargs + 2, self._shas[script], tail)
                for script, tail, nargs, _ in batch)
            self.round_trips += 1
            await conn.send_packed_command(data, check_health=False)
            replies: list = []
            for _ in batch:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as e:  # that call's error; the others' replies follow
                    replies.append(e)
        except BaseException:
            await self._drop(conn)  # (a reply half read, or none: not used again)
            raise
        self._idle.append(conn)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis restarted, or SCRIPT FLUSH: load them again, send what failed.
            await self._load_scripts()
            again = [b for b, r in zip(batch, replies) if isinstance(r, NoScriptError)]
            more = iter(await self._pipeline(again))
            replies = [next(more) if isinstance(r, NoScriptError) else r for r in replies]
        return replies

    async def _drop(self, conn) -> None:
        try:
            await conn.disconnect()
        finally:
            await self._pool.release(conn)

    async def _drop_idle(self) -> None:
        """Close the connections kept for pipelines (Redis came back: they are from
        before)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await self._drop(conn)
            except Exception:
                pass

    # ------------------------------------------------------------------ admission

    def _admit_parts(self, name: str, day: str, month: str, rpm, tpm, concurrent,
                     checks: tuple) -> tuple[bytes, bytes, int]:
        """The parts of an ADMIT call that depend on the key, its limits and the day only:
        (numkeys and keys, the arguments after the reservation, how many in all),
        packed once and kept."""
        k = (name, day, rpm, tpm, concurrent, checks)
        parts = self._parts.get(k)
        if parts is None:
            if len(self._parts) > 10_000:
                self._parts.clear()
            base = key_base(name)
            keys = [base + "fl", base + "rs", base + "rsn", base + "lp", base + "rq",
                    base + "tk", base + "tkn", f"{base}d:{day}", f"{base}m:{month}",
                    base + "all"]
            after = [-1 if rpm is None else rpm, -1 if tpm is None else tpm,
                     -1 if concurrent is None else concurrent, 3,
                     DAY_TTL_MS, MONTH_TTL_MS, 0]
            for c in checks:
                after += (c.period + 1, c.field, c.limit, 1 if c.reserved else 0)
            head = _pack([len(keys), *keys])
            parts = self._parts[k] = (head, _pack(after), 1 + len(keys) + 4 + len(after))
        return parts

    async def admit(self, name: str, rid: str, start: float, reserve: int,
                    rpm: int | None, tpm: int | None, concurrent: int | None,
                    checks: Iterable[Check]) -> Verdict:
        """One ADMIT for a request of key `name`; raises Unavailable."""
        if not self._reachable:
            raise Unavailable("unreachable")
        day, month = periods_of(start)
        checks = tuple(checks)
        head, after, nargs = self._admit_parts(name, day, month, rpm, tpm, concurrent, checks)
        tail = b"".join((head, _pack((int(self.clock() * 1000), rid, LEASE_MS, reserve)),
                         after))
        reply = await self._call("admit", tail, nargs)
        try:
            verdict = _verdict(reply, len(checks))
        except (TypeError, ValueError, IndexError):
            # Not ADMIT's answer (a server that runs Lua otherwise, something between):
            # the request is not admitted on it, redis_failure applies.
            now = time.monotonic()
            if now - self._warned_reply >= WARN_EVERY_S:
                self._warned_reply = now
                log.error("keygate: Redis answered an admission with %.80r, not what keygate's "
                          "script answers; limits follow redis_failure for such requests", reply)
            raise Unavailable("unexpected reply") from None
        if verdict.kind == ADMITTED:
            self.leases[rid] = name
        return verdict

    # ------------------------------------------------------------------ settlement

    def settle(self, name: str, rid: str, start: float, tokens: int, in_tpm: bool,
               amounts: dict[str, str] | None = None, local: bool = False,
               in_rpm: bool = False) -> None:
        """The request `rid` of `name` ended having used `tokens` (and `amounts`, such as
        {"c": "0.0012"} for money): sent with the next pipeline, not awaited. `local`: it
        was admitted by this process while Redis was unreachable (with `in_rpm`, it joins
        the rpm window at `start`)."""
        self.leases.pop(rid, None)
        day, month = periods_of(start)
        k = (name, day)
        head = self._settle_heads.get(k)
        if head is None:
            if len(self._settle_heads) > 10_000:
                self._settle_heads.clear()
            head = self._settle_heads[k] = _pack([9, *_settle_keys(name, day, month)])
        nkeys = 9
        if local and in_rpm:
            head = _pack([10, *_settle_keys(name, day, month), key_base(name) + "rq"])
            nkeys = 10
        args: list = [int(self.clock() * 1000), rid, max(0, int(tokens)),
                      1 if in_tpm else 0, f"l{int(start * 1000)}" if local else "a", 3,
                      DAY_TTL_MS, MONTH_TTL_MS, 0]
        for field, amount in (amounts or {}).items():
            args += (field, amount)
        call = (head + _pack(args), 1 + nkeys + len(args), start)
        if not self._reachable:
            self._keep(call)
            return
        fut = self._call("settle", *call[:2])
        fut.add_done_callback(lambda f: self._settled(f, call))

    def _settled(self, fut: asyncio.Future, call: tuple[bytes, int, float]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self._keep(call)

    def _keep(self, call: tuple[bytes, int, float]) -> None:
        if len(self.pending) < PENDING_LIMIT:
            self.pending.append(call)
        elif len(self.pending) == PENDING_LIMIT:
            self.pending.append(call)
            log.error("keygate: %d settlements wait for Redis; later ones are dropped (the "
                      "usage log keeps them: keygate usage --restore-counters)", PENDING_LIMIT)

    async def _send_pending(self) -> None:
        # A chunk stays in its list until Redis has answered for it: `pending` and
        # `pending_hours` are what Redis does not have yet (later ones are appended).
        while self.pending_hours and self._reachable:
            chunk = self.pending_hours[:5000]
            calls = list(hour_calls(chunk))
            futs = [self._call("hourly", tail, nargs) for tail, nargs, _ in calls]
            results = await asyncio.gather(*futs, return_exceptions=True)
            failed = [i for (*_, kept), r in zip(calls, results)
                      if isinstance(r, BaseException) for i in kept]
            self.pending_hours = failed + self.pending_hours[len(chunk):]
            if failed:
                return
        while self.pending and self._reachable:
            chunk = self.pending[:1000]
            futs = [self._call("settle", *call[:2]) for call in chunk]
            results = await asyncio.gather(*futs, return_exceptions=True)
            failed = [c for c, r in zip(chunk, results) if isinstance(r, BaseException)]
            self.pending = failed + self.pending[len(chunk):]
            if failed:
                return
            if not self.pending:
                log.info("keygate: settlements held while Redis was unreachable are sent")

    # ------------------------------------------------------------------ hourly totals

    def add_record(self, record: dict) -> None:
        """A finished request's record: its hourly increments go out with this turn's
        pipeline (not awaited); while Redis is unreachable they are held."""
        item = hour_item(record, self.models)
        if item is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (not on the event loop: held, sent with the next ones)
            self._keep_hour(item)
            return
        if not self._reachable:
            self._keep_hour(item)
            return
        self._items.append(item)
        if len(self._items) == 1:
            loop.call_soon(self._flush)

    def _hours_sent(self, fut: asyncio.Future, items: list[tuple]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            for item in items:
                self._keep_hour(item)

    def _keep_hour(self, item: tuple) -> None:
        if len(self.pending_hours) < PENDING_LIMIT:
            self.pending_hours.append(item)
        elif len(self.pending_hours) == PENDING_LIMIT:
            self.pending_hours.append(item)
            log.error("keygate: %d usage records wait for Redis' hourly totals; later ones "
                      "are left out of them (keygate usage --restore-counters puts them "
                      "back from the logs)", PENDING_LIMIT)

    async def read_hours(self, hours: list[str], more: Iterable[str] = ()) -> list[dict]:
        """The hashes of `hours` ("YYYY-MM-DDTHH"), then of the Redis keys `more`, one
        HGETALL each, in one pipeline; raises Unavailable."""
        if not self._reachable:
            raise Unavailable("unreachable")
        if self._reader is None:
            import redis

            self._reader = redis.Redis.from_url(
                self._reader_url, socket_timeout=READ_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S, max_connections=8)
        reader = self._reader
        names = [HOURS + hour for hour in hours] + list(more)

        def work() -> list:
            pipe = reader.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(name)
            return pipe.execute()

        try:
            self.round_trips += 1
            return await asyncio.wait_for(asyncio.to_thread(work), READ_TIMEOUT_S * 2)
        except Exception as e:
            raise Unavailable(_describe(e)) from None

    # ------------------------------------------------------------------ leases

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            if not self.leases or not self._reachable:
                continue
            by_key: dict[str, list[str]] = {}
            for rid, name in list(self.leases.items()):
                by_key.setdefault(name, []).append(rid)
            expiry = int(self.clock() * 1000) + LEASE_MS
            futs = [self._call("renew", _pack([1, key_base(name) + "fl", expiry, *rids]),
                               len(rids) + 3)
                    for name, rids in by_key.items()]
            await asyncio.gather(*futs, return_exceptions=True)


# ---------------------------------------------------------------------- hourly totals


# A group's JSON and a latency field, made once per distinct value (bounded: cleared when
# full), not once per record.
_GROUP_TEXT: dict[tuple, str] = {}
_LATENCY_TEXT: dict[tuple, str] = {}
_TEXTS_MAX = 50_000


def hour_item(record: dict, models: set[str], max_models: int | None = None) -> tuple | None:
    """(ts, hour, group as JSON, prompt, completion, total, cost (Decimal) or None, latency
    field or None) of a record, with the group values accounting/hourly.py gives it (model
    names past `max_models` distinct ones are its OTHER_MODEL); None without a ts."""
    ts = record.get("ts")
    if not (type(ts) is str and len(ts) == 24 and ts[10] == "T" and ts[23] == "Z"):
        ts = record_ts(record)
        if ts is None:
            return None
    model = group_text(record.get("model"))
    if model is not None and model not in models:
        if len(models) >= (MAX_MODELS if max_models is None else max_models):
            model = OTHER_MODEL
        else:
            models.add(model)
    status = record.get("status")
    error = group_text(record.get("error"))
    channel = group_text(record.get("channel"))
    values = (group_text(record.get("key")), model, channel,
              status if type(status) is int else None, error)
    group = _GROUP_TEXT.get(values)
    if group is None:
        if len(_GROUP_TEXT) >= _TEXTS_MAX:
            _GROUP_TEXT.clear()
        group = _GROUP_TEXT[values] = json.dumps(values, separators=(",", ":"))
    p, q, t = (record.get(f) for f in ("prompt_tokens", "completion_tokens", "total_tokens"))
    cost = record.get("cost")
    d = to_decimal(cost) if cost is not None else None
    lat = None
    if not (type(error) is str and error in REFUSED):
        ms = record.get("duration_ms")
        if type(ms) in (int, float):
            at = (channel, bucket_of(ms))
            lat = _LATENCY_TEXT.get(at)
            if lat is None:
                if len(_LATENCY_TEXT) >= _TEXTS_MAX:
                    _LATENCY_TEXT.clear()
                lat = _LATENCY_TEXT[at] = "l" + json.dumps(at, separators=(",", ":"))
    return (ts, ts[:13], group, p if type(p) is int else 0, q if type(q) is int else 0,
            t if type(t) is int else 0, d, lat)


def hour_fields(items: Iterable[tuple],
                out: dict[str, dict[str, list]] | None = None) -> dict[str, dict[str, list]]:
    """{hour: {field: [op, amount]}} of `hour_item`s summed (into `out`): HOURLY's
    arguments."""
    if out is None:
        out = {}
    for _ts, hour, g, p, q, t, cost, lat in items:
        f = out.get(hour)
        if f is None:
            f = out[hour] = {}
        for letter, n in (("r", 1), ("p", p), ("q", q), ("t", t)):
            if n or letter == "r":
                a = f.get(letter + g)
                if a is None:
                    f[letter + g] = ["i", n]
                else:
                    a[1] += n
        if cost is not None:
            a = f.get("c" + g)
            if a is None:
                f["c" + g] = ["d", cost]
            else:
                a[1] = MONEY.add(a[1], cost)
        if lat is not None:
            a = f.get(lat)
            if a is None:
                f[lat] = ["i", 1]
            else:
                a[1] += 1
    return out


def hour_call(hour: str, fields: dict[str, list]) -> tuple[bytes, int]:
    """One HOURLY call (packed as `_call` takes it) adding `fields` to `hour`."""
    args: list = [1, HOURS + hour, HOUR_TTL_MS]
    for field, (op, n) in fields.items():
        args += (op, field, money_text(n) if op == "d" else n)
    return _pack(args), len(args)


def hour_calls(items: list[tuple]) -> Iterable[tuple[bytes, int, list[tuple]]]:
    """HOURLY calls for `items`: (call, nargs, the items it adds) per hour."""
    of_hour: dict[str, list[tuple]] = {}
    for item in items:
        of_hour.setdefault(item[1], []).append(item)
    for hour, fields in hour_fields(items).items():
        tail, nargs = hour_call(hour, fields)
        yield tail, nargs, of_hour[hour]


def hourly_from(hours: list[str], replies: list[dict]):
    """An accounting.hourly.Hourly holding what Redis answered for `hours`: it answers
    rows, series and key totals as the one fed with every instance's records would."""
    hourly = Hourly(max_groups=1 << 62)
    index = {"r": 0, "p": 1, "q": 2, "t": 3}
    parsed: dict = {}  # a field less its letter -> its group (the same in every hour)
    for hour, fields in zip(hours, replies):
        if not fields:
            continue
        groups: dict[tuple, list] = {}
        for f, v in fields.items():
            if type(f) is bytes:
                f = f.decode()
            rest = f[1:]
            g = parsed.get(rest)
            try:
                if g is None:
                    g = parsed[rest] = tuple(json.loads(rest))
                letter = f[0]
                if letter == "l":
                    ch, b = g
                    h = hourly.latency.get((hour, ch))
                    if h is None:
                        h = hourly.latency[(hour, ch)] = {}
                    h[b] = h.get(b, 0) + int(v)
                    continue
                c = groups.get(g)
                if c is None:
                    c = groups[g] = [0, 0, 0, 0, None]
                if letter == "c":
                    c[4] = Decimal(v.decode() if type(v) is bytes else v)
                else:
                    c[index[letter]] = int(v)
            except (ValueError, TypeError, KeyError, IndexError, InvalidOperation):
                continue  # (not keygate's: left out)
        hourly.hours[hour] = groups
        hourly.groups += len(groups)
        for g in groups:
            if len(g) > 1 and g[1] is not None:
                hourly.models.add(g[1])
        hourly.newest = max(hourly.newest, hour)
    return hourly


def _iso(t: float) -> str:
    """A time (s) as the usage lines write `ts`."""
    ms = int(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _pack(args) -> bytes:
    """Arguments as RESP bulk strings, as Redis reads them."""
    out = []
    for a in args:
        t = type(a)
        if t is str:
            b = a.encode()
        elif t is int:
            b = b"%d" % a
        elif t is bytes:
            b = a
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _verdict(reply, nchecks: int) -> Verdict:
    """ADMIT's reply as a Verdict; raises ValueError (or TypeError, IndexError) for one
    the script does not give."""
    if type(reply) is not list:
        raise ValueError(reply)
    kind = int(reply[0])
    if kind == ADMITTED:
        return Verdict(ADMITTED, rpm_used=int(reply[1]), tpm_used=int(reply[2]))
    if kind in (RPM, TPM):
        return Verdict(kind, wait=max(0, int(reply[1])) / 1000)
    if kind == CONCURRENT:
        return Verdict(kind)
    check = int(reply[1])
    if kind == USED_UP and 1 <= check <= nchecks or kind == HELD and 0 <= check <= nchecks:
        return Verdict(kind, check=check)
    raise ValueError(reply)


def _open(conn) -> bool:
    """Whether a connection kept between pipelines is still open: the event loop reads
    its socket all along, so a close or reset by Redis shows in its stream at once (the
    check redis-py's pool makes, a read with a zero timeout, costs a system call)."""
    reader = getattr(conn, "_reader", None)
    return reader is not None and not reader.at_eof() and reader.exception() is None


def _describe(e: BaseException) -> str:
    """What went wrong, without the URL (it may hold a password)."""
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {CALL_TIMEOUT_S:g} s"
    text = str(e) or type(e).__name__
    return text.split("redis://")[0].split("rediss://")[0].strip() or type(e).__name__


def check_url(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Connect to Redis at `url` once, synchronously (start-up, `keygate usage
    --restore-counters`): None when it answers as Redis does, else what is wrong, for an
    operator. A server that cannot be reached is "unreachable: ..."; a wrong password or a
    server that is not Redis says so."""
    import redis
    from redis import exceptions as rx

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
        client.script_load(ADMIT)
    except rx.AuthenticationError as e:
        return f"Redis refused the credentials in the URL ({_describe(e)})"
    except rx.ResponseError as e:
        text = _describe(e)
        if "NOAUTH" in text or "WRONGPASS" in text or "AUTH" in text.upper():
            return f"Redis refused the credentials in the URL ({text})"
        return f"the server does not answer as Redis does ({text})"
    except (rx.InvalidResponse, rx.DataError) as e:
        return f"the server does not answer as Redis does ({_describe(e)})"
    except (rx.TimeoutError, TimeoutError) as e:
        return f"unreachable: no answer within {timeout:g} s ({_describe(e)})"
    except (rx.ConnectionError, OSError) as e:
        text = _describe(e)
        if "Protocol" in text or "protocol" in text:
            return f"the server does not answer as Redis does ({text})"
        return f"unreachable: {text}"
    except rx.RedisError as e:
        return f"the server does not answer as Redis does ({_describe(e)})"
    finally:
        try:
            client.close()
        except Exception:
            pass
    return None
