"""keygate/model/prices.py: [[prices]] and [gateway] currency in gateway.toml, the cost of a
request, and money written to and read back from the usage log exactly
(docs/configuration.md#prices, docs/usage-log.md#cost)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.unit import make_config, make_flow, with_state
from keygate.accounting.log import encode, parse_line, read_records, scan_lines
from keygate.accounting.totals import Summer
from keygate.model.prices import (
    CURRENCIES,
    Price,
    PriceList,
    json_with_money,
    money_text,
    parse_currency,
    to_decimal,
)
from keygate.model.settings import ConfigError, parse_settings
from keygate.stages.metering import TokenCounts, read_usage
from keygate.stages.recorder import build_record, set_cost

PATH = Path("/tmp/x/gateway.toml")

CHANNELS = """
[[channels]]
name = "local"
base_url = "http://127.0.0.1:11434"

[[channels]]
name = "deepseek"
kind = "openai"
base_url = "https://api.deepseek.com/v1"
models = ["deepseek-*"]
"""


def prices(toml: str, channels: str = CHANNELS) -> PriceList:
    return parse_settings(channels + toml, PATH, environ={}).prices


def error(toml: str, channels: str = CHANNELS) -> str:
    with pytest.raises(ConfigError) as e:
        parse_settings(channels + toml, PATH, environ={})
    return str(e.value)


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the last line holding `needle`."""
    return max(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# --------------------------------------------------------------------------- parsing


def test_no_prices_means_no_cost_and_usd():
    p = parse_settings("", PATH, environ={}).prices
    assert p == PriceList() and p.currency == "USD" and p.entries == ()
    assert p.cost("llama3.2", None, 100, 100) is None


def test_prices_are_exact_decimals_from_the_text():
    p = prices("""
[[prices]]
models = ["deepseek-*"]
input = 0.27
output = 1.10
cached_input = 0.07
""")
    (entry,) = p.entries
    assert entry == Price(("deepseek-*",), None, Decimal("0.27"), Decimal("1.10"),
                          Decimal("0.07"))
    assert type(entry.input) is Decimal and str(entry.input) == "0.27"


def test_whole_numbers_and_currency():
    p = prices('[gateway]\ncurrency = "EUR"\n[[prices]]\nmodels = ["m"]\ninput = 2\noutput = 0\n',
               channels="")
    assert p.currency == "EUR"
    assert p.entries[0].input == Decimal(2) and p.entries[0].output == Decimal(0)
    assert p.cost("m", None, 1_000_000, 5) == Decimal(2)


def test_other_settings_still_read_as_numbers():
    """Prices are read with decimal floats; the rest of the file as before (floats)."""
    s = parse_settings('[gateway]\nusage_log_max_mb = 0.5\n[[prices]]\nmodels = ["m"]\n'
                       'input = 0.1\noutput = 0.2\n', PATH, environ={})
    assert s.usage_log_max_bytes == 512 * 1024
    assert s.prices.entries[0].input == Decimal("0.1")


@pytest.mark.parametrize("code", sorted(["USD", "EUR", "CNY", "JPY", "GBP", "CHF", "XXX"]))
def test_known_currencies(code):
    assert parse_currency(code) == code and code in CURRENCIES


@pytest.mark.parametrize("bad, hint", [
    ("usd", "write it in capitals: 'USD'"), ("DOLLARS", "ISO 4217"), ("ABC", "ISO 4217"),
    ("", "ISO 4217"), (1, "ISO 4217"),
])
def test_unknown_currency_is_an_error_with_its_line(bad, hint):
    toml = f'[gateway]\nkeys_file = "k.yaml"\ncurrency = {json.dumps(bad)}\n'
    msg = error(toml, channels="")
    assert msg.startswith(f"{PATH}:3: currency must be an ISO 4217 code") and hint in msg


# --------------------------------------------------------------------------- matching


MATCHING = """
[[prices]]
models = ["deepseek-*"]
input = 1
output = 2

[[prices]]
models = ["deepseek-chat", "llama3.2:*"]
input = 3
output = 4

[[prices]]
models = ["deepseek-*"]
channel = "deepseek"
input = 5
output = 6

[[prices]]
models = ["*"]
channel = "deepseek"
input = 7
output = 8
"""


@pytest.mark.parametrize("model, channel, expected", [
    ("deepseek-chat", "deepseek", 5),  # a channel's price over a general one
    ("deepseek-chat", None, 1),  # among equals (no channel), the first listed
    ("deepseek-chat", "local", 1),  # another channel's price does not apply
    ("deepseek-reasoner", "deepseek", 5),
    ("other", "deepseek", 7),  # the channel's catch-all
    ("llama3.2", "local", 3),  # without a tag, as llama3.2:latest (settings.match_any)
    ("llama3.2:1b", None, 3),
    ("qwen2.5:7b", "local", None),  # no match: no cost
    ("DEEPSEEK-CHAT", None, None),  # patterns match as channels' do: case counts
    (None, "deepseek", None),  # no model (/api/ps, /api/version): no cost
])
def test_the_most_specific_entry_wins(model, channel, expected):
    p = prices(MATCHING)
    found = p.find(model, channel)
    assert (found.input if found else None) == (Decimal(expected) if expected else None)
    assert p.find(model, channel) is found  # remembered, the same answer


def test_the_remembered_answers_are_bounded():
    p = prices(MATCHING)
    for i in range(5000):
        p.find(f"m{i}", None)
    assert len(p._found) <= 4096


# --------------------------------------------------------------------------- cost


@pytest.mark.parametrize("prompt, completion, cached, expected", [
    (11, 18, 0, "0.00002277"),  # 11 x 0.27 + 18 x 1.10 per million
    (11, 18, 5, "0.00002177"),  # 6 x 0.27 + 5 x 0.07 + 18 x 1.10
    (0, 0, 0, "0"),
    (1, 0, 0, "0.00000027"),
    (1_000_000, 1_000_000, 0, "1.37"),
    (10, 0, 99, "0.0000007"),  # cached tokens are among the prompt tokens: at most all
    (-5, 3, 0, "0.0000033"),  # nonsense counts count as 0
])
def test_cost_is_exact(prompt, completion, cached, expected):
    price = Price(("*",), None, Decimal("0.27"), Decimal("1.10"), Decimal("0.07"))
    cost = price.cost(prompt, completion, cached)
    assert cost == Decimal(expected) and money_text(cost) == expected


def test_cached_tokens_without_a_cached_price_cost_the_input_price():
    price = Price(("*",), None, Decimal("0.27"), Decimal("1.10"))
    assert price.cost(11, 18, 5) == price.cost(11, 18, 0) == Decimal("0.00002277")


def test_cost_of_many_digits_is_not_rounded():
    price = Price(("*",), None, Decimal("0.123456789"), Decimal("3.000000001"))
    cost = price.cost(123_456_789, 987_654_321)
    assert cost == (Decimal("0.123456789") * 123_456_789
                    + Decimal("3.000000001") * 987_654_321) / 1_000_000
    assert money_text(cost) == "2978.204542737844842"


@pytest.mark.parametrize("amount, text", [
    ("0.00001100", "0.000011"), ("1.1E-5", "0.000011"), ("2.97E-7", "0.000000297"),
    ("1E+3", "1000"), ("0", "0"), ("0E-8", "0"), ("12.50", "12.5"),
])
def test_money_text_is_plain_digits(amount, text):
    assert money_text(Decimal(amount)) == text
    assert Decimal(json.loads(text, parse_float=str) if "." in text else text) == Decimal(amount)


@pytest.mark.parametrize("value, expected", [
    (Decimal("0.5"), Decimal("0.5")), (3, Decimal(3)), (1.1e-05, Decimal("0.000011")),
    (None, None), ("0.5", None), (True, None), (-1, None), (Decimal("-0.1"), None),
    (float("nan"), None), (float("inf"), None), (Decimal("NaN"), None),
])
def test_to_decimal(value, expected):
    assert to_decimal(value) == expected


def test_json_with_money_writes_exact_numbers_and_nothing_else():
    doc = [{"cost": Decimal("0.00002277"), "name": "x\x00y", "n": 1.5, "none": None},
           {"more": [Decimal("1E+2"), Decimal("0E-8")]}]
    text = json_with_money(doc, indent=2)
    assert json.loads(text, parse_float=Decimal) == [
        {"cost": Decimal("0.00002277"), "name": "x\x00y", "n": Decimal("1.5"), "none": None},
        {"more": [100, 0]}]
    assert "0.00002277" in text and "e-" not in text.lower()


# --------------------------------------------------------------------------- bad input


BAD = [
    ('input = -1', "input must be a number >= 0", "input = -1"),
    ('input = -0.01', "input must be a number >= 0", "input = -0.01"),
    ('input = "0.27"', "input must be a number >= 0", 'input = "0.27"'),
    ('input = true', "input must be a number >= 0", "input = true"),
    ('input = nan', "input must be a number >= 0", "input = nan"),
    ('input = inf', "input must be a number >= 0", "input = inf"),
    ('input = [1]', "input must be a number >= 0", "input = [1]"),
    ('input = 1e99', "input must be a number >= 0", "input = 1e99"),
    ('output = -2', "output must be a number >= 0", "output = -2"),
    ('cached_input = -0.5', "cached_input must be a number >= 0", "cached_input = -0.5"),
    ('models = []', "models must be a non-empty list", "models = []"),
    ('models = [""]', "models must be a non-empty list", 'models = [""]'),
    ('models = [1]', "models must be a non-empty list", "models = [1]"),
    ('channel = "nope"', "channel 'nope' is not one of the [[channels]]", 'channel = "nope"'),
    ('channel = 3', "channel must be a channel's name", "channel = 3"),
    ('price = 1', "unknown setting 'price'", "price = 1"),
]


@pytest.mark.parametrize("setting, message, at", BAD)
def test_bad_prices_name_their_line(setting, message, at):
    name = setting.split()[0]
    body = {"models": 'models = ["deepseek-*"]', "input": "input = 0.27",
            "output": "output = 1.10"}
    body[name] = setting
    toml = "\n[[prices]]\n" + "\n".join(body.values()) + "\n"
    text = CHANNELS + toml
    msg = error(toml)
    assert message in msg, msg
    assert msg.startswith(f"{PATH}:{line_of(text, at)}: "), msg


@pytest.mark.parametrize("missing", ["input", "output"])
def test_input_and_output_are_required(missing):
    toml = '\n[[prices]]\nmodels = ["m"]\ninput = 1\noutput = 2\n'.replace(
        f"{missing} = ", f"# {missing} = ")
    msg = error(toml)
    assert f"{missing} is required" in msg
    assert msg.startswith(f"{PATH}:{line_of(CHANNELS + toml, '[[prices]]')}: ")


def test_an_entry_without_models_is_an_error():
    msg = error("\n[[prices]]\ninput = 1\noutput = 2\n")
    assert "price #1: models must be a non-empty list" in msg


def test_two_entries_equally_specific_for_a_pattern_conflict():
    toml = """
[[prices]]
models = ["deepseek-*", "llama3.2:*"]
input = 1
output = 1

[[prices]]
models = ["qwen*", "llama3.2:*"]
input = 2
output = 2
"""
    msg = error(toml)
    assert "price #1 already prices 'llama3.2:*'" in msg
    assert msg.startswith(f"{PATH}:{line_of(CHANNELS + toml, 'qwen*')}: ")
    # the same pattern on the same channel conflicts too ...
    on_channel = toml.replace("output = 1\n", 'output = 1\nchannel = "local"\n').replace(
        "output = 2\n", 'output = 2\nchannel = "local"\n')
    assert "on channel 'local'" in error(on_channel)
    # ... but not with and without a channel, nor on two channels: one is more specific,
    # or they never price the same request
    assert len(prices(toml.replace("output = 2\n", 'output = 2\nchannel = "local"\n')).entries) == 2
    two = toml.replace("output = 1\n", 'output = 1\nchannel = "deepseek"\n').replace(
        "output = 2\n", 'output = 2\nchannel = "local"\n')
    assert len(prices(two).entries) == 2


def test_prices_must_be_an_array_of_tables():
    assert "prices must be an array of tables" in error("prices = 3\n", channels="")
    msg = error('prices = [{models = ["m"], input = -1, output = 1}]\n', channels="")
    assert msg.startswith(f"{PATH}:1: ") and "input must be a number >= 0" in msg


def test_unknown_tables_are_still_errors():
    assert "unknown table 'price'" in error("[[price]]\nmodels = ['m']\n", channels="")


# --------------------------------------------------------------------------- the log


def test_a_cost_is_written_with_its_exact_digits_and_read_back_as_them():
    rec = {"id": "a", "cost": Decimal("0.0000110000")}
    line = encode(rec)
    assert line == b'{"id":"a","cost":0.000011}\n'
    assert parse_line(line) == {"id": "a", "cost": Decimal("0.000011")}
    got = []
    scan_lines(line + encode({"id": "b", "cost": None}) + encode({"cost": Decimal(7)}), got.append)
    assert got == [{"id": "a", "cost": Decimal("0.000011")}, {"id": "b", "cost": None},
                   {"cost": 7}]


def test_a_cost_of_more_digits_than_a_float_holds_is_read_exactly():
    digits = "15.241578750190521987"
    line = encode({"model": "m", "cost": Decimal(digits)})
    assert line.endswith(b'"cost":15.241578750190521987}\n')
    out = []
    scan_lines(line, out.append)
    assert out[0]["cost"] == Decimal(digits)


def test_the_fallback_writer_keeps_exact_digits():
    """A line orjson refuses (a lone surrogate) is written by the json module: its cost stays a
    number with the same digits."""
    line = encode({"model": "a\udcff", "cost": Decimal("0.00000297")})
    assert line.endswith(b',"cost":0.00000297}\n')
    assert parse_line(line)["cost"] == Decimal("0.00000297")


def test_a_nested_cost_is_not_taken_for_the_records():
    out = []
    scan_lines(b'{"cost":1.5,"x":{"cost":2.5}}\n{"cost": 2.5e-7 }\n', out.append)
    assert [r["cost"] for r in out] == [Decimal("1.5"), Decimal("2.5E-7")]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**7),
                          st.sampled_from(["0.27", "1.10", "0.07", "0.123456789", "3", "0"])),
                min_size=1, max_size=300))
def test_a_report_sums_to_exactly_the_sum_of_its_lines(tmp_path_factory, requests):
    path = tmp_path_factory.mktemp("log") / "usage.jsonl"
    expected = Decimal(0)
    with open(path, "wb") as f:
        for i, (prompt, completion, rate) in enumerate(requests):
            cost = Price(("*",), None, Decimal(rate), Decimal("1.10")).cost(prompt, completion)
            expected += cost
            f.write(encode({"ts": "2026-11-27T01:02:03.123Z", "key": "k", "cost": cost,
                            "total_tokens": prompt + completion}))
    summer = Summer(())
    assert read_records(path, summer.add) == 0
    (row,) = summer.rows()
    assert row.totals.cost == expected


def test_a_million_line_report_is_exact(tmp_path):
    """Costs of 0.1 (which no float holds) a million times: exactly 100000."""
    line = encode({"ts": "2026-11-27T01:02:03.123Z", "key": "k", "cost": Decimal("0.1")})
    path = tmp_path / "usage.jsonl"
    path.write_bytes(line * 1_000_000)
    summer = Summer(("key",))
    read_records(path, summer.add)
    assert summer.rows()[0].totals.cost == Decimal("100000.0")
    assert sum([0.1] * 1_000_000) != 100000  # what floats would have said


# --------------------------------------------------------------------------- a request


def priced_config():
    return make_config(CHANNELS + """
[[prices]]
models = ["deepseek-*"]
channel = "deepseek"
input = 0.27
output = 1.10
cached_input = 0.07
""")


def finished_flow(**state):
    f = make_flow("POST", "/v1/chat/completions", key="alice", body={"model": "deepseek-chat"})
    f.response = __import__("mitmproxy").http.Response.make(200, b"{}")
    return with_state(f, **state)


def test_the_line_carries_the_cost_of_its_tokens():
    prices_ = priced_config().state.settings.prices
    f = finished_flow(admitted=True, model="deepseek-chat", channel="deepseek",
                      prompt_tokens=11, completion_tokens=18, cached_tokens=5)
    set_cost(f, prices_)
    assert build_record(f, f.request.timestamp_start + 1)["cost"] == Decimal("0.00002177")


@pytest.mark.parametrize("state", [
    {"admitted": False, "model": "deepseek-chat", "channel": None},  # refused: not forwarded
    {"admitted": True, "model": "qwen2.5:7b", "channel": "local"},  # no price applies
    {"admitted": True, "model": "deepseek-chat", "channel": "local"},  # the price is deepseek's
])
def test_no_cost_where_no_price_applies(state):
    f = finished_flow(prompt_tokens=11, completion_tokens=18, **state)
    set_cost(f, priced_config().state.settings.prices)
    assert build_record(f, f.request.timestamp_start + 1)["cost"] is None


@pytest.mark.parametrize("api, doc, prompt, cached", [
    ("openai", {"usage": {"prompt_tokens": 11, "completion_tokens": 2,
                          "prompt_tokens_details": {"cached_tokens": 5}}}, 11, 5),
    ("openai", {"usage": {"prompt_tokens": 11, "completion_tokens": 2}}, 11, 0),
    ("openai", {"usage": {"prompt_tokens": 11, "prompt_tokens_details": None}}, 11, 0),
    ("responses", {"usage": {"input_tokens": 9, "output_tokens": 2,
                             "input_tokens_details": {"cached_tokens": 4}}}, 9, 4),
    # Anthropic's input_tokens leaves out the cached prompt tokens: they are added
    ("anthropic", {"type": "message_start", "message": {"usage": {
        "input_tokens": 3, "cache_read_input_tokens": 6, "cache_creation_input_tokens": 2,
        "output_tokens": 1}}}, 11, 6),
    ("ollama", {"prompt_eval_count": 7, "eval_count": 2}, 7, 0),
])
def test_cached_prompt_tokens_are_read_where_reported(api, doc, prompt, cached):
    tally = TokenCounts()
    read_usage(api, doc, tally)
    assert (tally.prompt_tokens, tally.cached_tokens) == (prompt, cached)


# --------------------------------------------------------------------------- keys.yaml


from click.testing import CliRunner  # noqa: E402

from keygate.cli.main import cli as keygate_cli  # noqa: E402
from keygate.model.keyring import parse_keys  # noqa: E402


def key_limits(limits: str):
    text = ("keys:\n  k:\n    key: sk-test-12345678\n    limits:\n" +
            "".join(f"      {line}\n" for line in limits.splitlines()))
    return parse_keys(text, "keys.yaml").by_name["k"].limits


@pytest.mark.parametrize("text, amount", [
    ("5", "5"), ("0.5", "0.5"), ("0.10", "0.1"), ("1e-6", "0.000001"), ('"12.50"', "12.50"),
    ("0", "0"), ("1.0e-05", "0.00001"),
])
def test_budgets_are_exact_money(text, amount):
    limits = key_limits(f"budget_per_day: {text}\nbudget_per_month: {text}\n"
                        f"budget_total: {text}")
    assert limits.budget_per_day == limits.budget_per_month == limits.budget_total \
        == Decimal(amount)
    assert type(limits.budget_total) is Decimal


def test_month_quotas_are_whole_numbers():
    limits = key_limits("requests_per_month: 100\ntokens_per_month: 20000000")
    assert (limits.requests_per_month, limits.tokens_per_month) == (100, 20000000)
    assert limits.quotas == ("requests_per_month", "tokens_per_month")


@pytest.mark.parametrize("text, message", [
    ("budget_per_day: -1", "limit budget_per_day must be a number >= 0"),
    ("budget_total: true", "limit budget_total must be a number >= 0"),
    ("budget_per_month: five", "limit budget_per_month must be a number >= 0"),
    ("budget_per_month: .nan", "limit budget_per_month must be a number >= 0"),
    ("budget_per_month: [1]", "limit budget_per_month must be a number >= 0"),
    ("requests_per_month: 1.5", "limit requests_per_month must be a whole number >= 0"),
    ("tokens_per_month: -3", "limit tokens_per_month must be a whole number >= 0"),
    ("budget: 5", "unknown limit 'budget'"),
])
def test_bad_limits_name_their_line(text, message):
    with pytest.raises(ConfigError) as e:
        key_limits(text)
    assert message in str(e.value) and str(e.value).startswith("keys.yaml:5: ")


def test_keys_add_takes_the_new_limits_and_list_shows_spend(tmp_path):
    gateway = tmp_path / "gateway.toml"
    gateway.write_text('[gateway]\nusage_log = "usage.jsonl"\n')
    env = {"KEYGATE_CONFIG": str(gateway)}
    run = CliRunner()
    done = run.invoke(keygate_cli, ["keys", "add", "k", "--budget-per-day", "5.25",
                                    "--budget-per-month", "50", "--budget-total", "0.000001",
                                    "--requests-per-month", "100", "--tokens-per-month", "7"],
                      env=env)
    assert done.exit_code == 0, done.output
    text = (tmp_path / "keys.yaml").read_text()
    assert "budget_per_day: 5.25\n" in text and "budget_per_month: 50\n" in text
    limits = parse_keys(text, "keys.yaml").by_name["k"].limits
    assert (limits.budget_per_day, limits.budget_per_month, limits.budget_total) == (
        Decimal("5.25"), Decimal(50), Decimal("0.000001"))
    assert (limits.requests_per_month, limits.tokens_per_month) == (100, 7)
    now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
    lines = [encode({"ts": now.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "key": "k", "error": None,
                     "total_tokens": 3, "cost": Decimal(c)}) for c in ("0.1", "0.2")]
    lines.append(encode({"ts": "2020-01-01T00:00:00.000Z", "key": "k", "error": None,
                         "total_tokens": 3, "cost": Decimal("1.000000000000000001")}))
    (tmp_path / "usage.jsonl").write_bytes(b"".join(lines))
    done = run.invoke(keygate_cli, ["keys", "list", "--format", "json"], env=env)
    assert done.exit_code == 0, done.output
    (row,) = json.loads(done.stdout, parse_float=Decimal)
    assert (row["spent_today"], row["spent_month"], row["spent_total"]) == (
        Decimal("0.3"), Decimal("0.3"), Decimal("1.300000000000000001"))
    assert row["limits"]["budget_per_day"] == Decimal("5.25")
    done = run.invoke(keygate_cli, ["keys", "list"], env=env)
    header, line = done.stdout.splitlines()
    assert header.split()[-3:] == ["SPENT_TODAY", "SPENT_MONTH", "SPENT_TOTAL"]
    assert line.split()[-3:] == ["0.3", "0.3", "1.300000000000000001"]
    assert "budget_per_day=5.25" in line


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "1.0000000000000001"])
def test_keys_add_refuses_a_bad_budget(tmp_path, value):
    gateway = tmp_path / "gateway.toml"
    gateway.write_text("")
    done = CliRunner().invoke(keygate_cli, ["keys", "add", "k", "--budget-total", value],
                              env={"KEYGATE_CONFIG": str(gateway)})
    assert done.exit_code == 2 and "--budget-total" in done.output
    assert not (tmp_path / "keys.yaml").exists()
