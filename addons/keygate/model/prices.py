"""[[prices]] of gateway.toml and the cost of one request (docs/configuration.md#prices,
docs/usage-log.md#cost).

Prices are money per million tokens in one currency ([gateway] currency). They are read
from the file's text as decimals, never as floats (0.27 stays 0.27), and a request's cost
is computed in decimal arithmetic from its exact token counts, so the total of a report is
the sum of its lines to the last digit.

Parsing is pure: `parse_prices` takes the [[prices]] array as tomllib reads it with
`parse_float=Decimal`, and returns a `PriceList` or raises ConfigError naming the line.
The same module writes and reads money: `money_text` (the digits of a usage line's
`cost`), `json_with_money` (JSON with Decimals as exact numbers) and `to_decimal` (what a
reader makes of a number it finds in a line).
"""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

# (keygate.model.settings imports this module: what this one needs of it is imported where
# it is used.)

DEFAULT_CURRENCY = "USD"

# ISO 4217 codes in use (and the funds and special codes the standard lists beside them).
CURRENCIES = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD
BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP
DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR
IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD
MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB
PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD
SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS
VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA
XXX YER ZAR ZMW ZWG ZWL
""".split())

# Wide enough that no cost or sum of costs keygate makes is ever rounded: a cost has at
# most a price's digits (MAX_PRICE_DIGITS) plus a token count's (20), and a sum of them a
# few digits more.
MONEY = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN,
                        traps=[decimal.InvalidOperation, decimal.Overflow])
ZERO = Decimal(0)
PRICE_FIELDS = ("models", "channel", "input", "output", "cached_input")
MAX_PRICE_DIGITS = 30  # significant digits of one price: more is a typo, not a price
_CACHE_MAX = 4096


def parse_currency(value: Any) -> str:
    """[gateway] currency: an ISO 4217 code such as "USD"; ValueError otherwise."""
    if not isinstance(value, str) or value not in CURRENCIES:
        hint = ""
        if isinstance(value, str) and value.upper() in CURRENCIES:
            hint = f" (write it in capitals: {value.upper()!r})"
        raise ValueError(f"currency must be an ISO 4217 code such as \"USD\" or \"EUR\", "
                         f"not {value!r}{hint}")
    return value


def money_text(amount: Decimal) -> str:
    """`amount` as the plain decimal digits JSON and TOML read as that exact number, without
    an exponent or trailing zeros: Decimal("0.00001100") -> "0.000011"."""
    text = format(amount.normalize(MONEY), "f")
    return "0" if text == "-0" else text


def to_decimal(value: Any) -> Decimal | None:
    """A cost as a reader finds it in a line: a Decimal (log.py reads the digits exactly),
    an int, or a float from elsewhere (its shortest digits); None for null and anything
    that is not a finite number >= 0."""
    t = type(value)
    if t is Decimal:
        return value if value.is_finite() and value >= 0 else None
    if t is int:
        return Decimal(value) if value >= 0 else None
    if t is float:
        if value != value or value in (float("inf"), float("-inf")) or value < 0:
            return None
        return Decimal(repr(value))
    return None


@dataclass(frozen=True)
class Price:
    """One [[prices]] entry: money per million tokens."""

    models: tuple[str, ...]
    channel: str | None
    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None

    def cost(self, prompt: int, completion: int, cached: int = 0) -> Decimal:
        """The price of one request: its prompt tokens at `input` (the `cached` ones among
        them at `cached_input`, where set) and its completion tokens at `output`."""
        prompt, completion = max(0, prompt), max(0, completion)
        cached = min(max(0, cached), prompt)
        m = MONEY
        total = m.add(m.multiply(self.input, prompt - cached),
                      m.multiply(self.output, completion))
        if cached:
            rate = self.input if self.cached_input is None else self.cached_input
            total = m.add(total, m.multiply(rate, cached))
        return total.scaleb(-6, m).normalize(m)


@dataclass(frozen=True)
class PriceList:
    """Every [[prices]] entry, in the order a request's price is looked for: those with a
    channel first, then the others, each in the file's order (docs/configuration.md#prices:
    the most specific entry wins; the first listed among equals)."""

    entries: tuple[Price, ...] = ()
    currency: str = DEFAULT_CURRENCY
    # (model, channel) -> the entry that prices it, remembered for the next request.
    _found: dict = field(default_factory=dict, repr=False, compare=False)

    def find(self, model: str | None, channel: str | None) -> Price | None:
        """The entry that prices a request for `model` served by `channel`, or None."""
        if not self.entries or not model:
            return None
        found = self._found
        at = (model, channel)
        if at in found:
            return found[at]
        from keygate.model.settings import match_any

        price = None
        for p in self.entries:
            if (p.channel is None or p.channel == channel) and match_any(p.models, model):
                price = p
                break
        if len(found) >= _CACHE_MAX:
            found.clear()
        found[at] = price
        return price

    def cost(self, model: str | None, channel: str | None, prompt: int, completion: int,
             cached: int = 0) -> Decimal | None:
        """The request's cost at these prices, or None where no entry applies."""
        price = self.find(model, channel)
        return None if price is None else price.cost(prompt, completion, cached)


def _amount(v: Any) -> Decimal | None:
    """A price as tomllib gives it with parse_float=Decimal; None if it is not a finite
    number >= 0."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        v = Decimal(v)
    elif isinstance(v, float):  # (a caller that read the file without parse_float)
        v = Decimal(repr(v))
    if not isinstance(v, Decimal) or not v.is_finite() or v < 0:
        return None
    if len(v.as_tuple().digits) > MAX_PRICE_DIGITS or v.adjusted() > 12:
        return None
    return v


def _shown(v: Any) -> str:
    return str(v) if isinstance(v, Decimal) else repr(v)


class _Lines:
    """The line of a [[prices]] entry, or of one of its settings, for error messages."""

    def __init__(self, text: str, path: Path | str) -> None:
        self.lines = text.splitlines()
        self.path = path

    def entry(self, index: int) -> tuple[int | None, int]:
        """(first line, end line) of the index-th [[prices]] table (0-based lines)."""
        seen = -1
        for n, line in enumerate(self.lines):
            if re.match(r"^\s*\[\[\s*prices\s*\]\]", line):
                seen += 1
                if seen == index:
                    end = n + 1
                    while end < len(self.lines) and not re.match(r"^\s*\[", self.lines[end]):
                        end += 1
                    return n, end
        for n, line in enumerate(self.lines):  # prices = [...] written inline
            if re.match(r"^\s*prices\s*=", line):
                return n, n + 1
        return None, 0

    def error(self, index: int, msg: str, setting: str | None = None):
        from keygate.model.settings import ConfigError

        first, end = self.entry(index)
        n = first
        if first is not None and setting is not None:
            rx = re.compile(rf"^\s*{re.escape(setting)}\s*=")
            n = next((i for i in range(first, end) if rx.match(self.lines[i])), first)
        return ConfigError(f"{self.path}:{n + 1}: {msg}" if n is not None
                           else f"{self.path}: {msg}")


def parse_prices(raw: Any, text: str, path: Path | str, currency: str = DEFAULT_CURRENCY,
                 channels: tuple[str, ...] | None = None) -> PriceList:
    """The [[prices]] array (tomllib with parse_float=Decimal) -> PriceList, or ConfigError
    with the line. `channels`: the names of [[channels]], which a price's `channel` must be
    one of (None: not checked)."""
    where = _Lines(text, path)
    if not isinstance(raw, list):
        raise where.error(0, "prices must be an array of tables: [[prices]]")
    entries: list[tuple[Price, int]] = []
    claimed: dict[tuple[str, str | None], int] = {}  # (pattern, channel) -> entry number
    for i, doc in enumerate(raw):
        label = f"price #{i + 1}"
        if not isinstance(doc, dict):
            raise where.error(i, f"{label} must be a table")
        for k in doc:
            if k not in PRICE_FIELDS:
                raise where.error(i, f"{label}: unknown setting {k!r} (known: "
                                     f"{', '.join(PRICE_FIELDS)})", k)
        models = doc.get("models")
        if isinstance(models, str):
            models = [models]
        if (not isinstance(models, list) or not models
                or not all(isinstance(m, str) and m for m in models)):
            raise where.error(i, f"{label}: models must be a non-empty list of model name "
                                 "patterns", "models" if "models" in doc else None)
        label = f"price for {models[0]!r}" if len(models) == 1 else f"{label} ({models[0]!r}, ...)"
        channel = doc.get("channel")
        if channel is not None:
            if not isinstance(channel, str) or not channel:
                raise where.error(i, f"{label}: channel must be a channel's name", "channel")
            if channels is not None and channel not in channels:
                raise where.error(i, f"{label}: channel {channel!r} is not one of the "
                                     "[[channels]]", "channel")
        amounts: dict[str, Decimal | None] = {}
        for name in ("input", "output", "cached_input"):
            if name not in doc:
                if name != "cached_input":
                    raise where.error(i, f"{label}: {name} is required (money per million "
                                         f"{'prompt' if name == 'input' else 'completion'} "
                                         "tokens)")
                amounts[name] = None
                continue
            amount = _amount(doc[name])
            if amount is None:
                raise where.error(i, f"{label}: {name} must be a number >= 0 (money per "
                                     f"million tokens, in {currency}), not "
                                     f"{_shown(doc[name])}", name)
            amounts[name] = amount
        for pattern in models:
            other = claimed.get((pattern, channel))
            if other is not None:
                on = f" on channel {channel!r}" if channel is not None else ""
                raise where.error(i, f"{label}: price #{other + 1} already prices "
                                     f"{pattern!r}{on}; which one applies would depend only "
                                     "on their order", "models")
            claimed[(pattern, channel)] = i
        entries.append((Price(tuple(models), channel, amounts["input"], amounts["output"],
                              amounts["cached_input"]), i))
    # Channel prices before general ones; the file's order among equals (sorted is stable).
    ordered = sorted(entries, key=lambda e: e[0].channel is None)
    return PriceList(tuple(p for p, _ in ordered), currency)


def json_with_money(obj: Any, **kw: Any) -> str:
    """json.dumps(obj, **kw) with every Decimal in it (in dicts and lists) written as a JSON
    number with its exact digits. The json module writes a Decimal only as text: each goes
    in as a placeholder drawn at random for this call (so no string in `obj` can hold it),
    and the placeholder's quoted form is then replaced by the digits."""
    import json
    import os
    import re

    mark = "\x00" + os.urandom(8).hex() + ":"
    digits: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Decimal) and v.is_finite():
            digits.append(money_text(v))
            return f"{mark}{len(digits) - 1}"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(obj), **kw)
    if not digits:
        return text
    # Every placeholder in one pass (one str.replace each rescanned the whole text: 45 s
    # for 50,000 rows).
    quoted = json.dumps(mark, ensure_ascii=kw.get("ensure_ascii", True))[:-1]
    return re.sub(re.escape(quoted) + r'(\d+)"', lambda m: digits[int(m[1])], text)
