"""What keygate runs with in the bench: keys.yaml (10,000 keys, or the one the load uses)
and gateway.toml (three channels on one upstream)."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class KeySet:
    """The bench's keys: `main` is in both files with the same settings and is the one the
    load uses; the big file adds `count - 1` more of every kind a real file has."""

    count: int
    main_secret: str
    big_yaml: str
    one_yaml: str
    names: list[str] = field(repr=False)
    plain_secret: str = field(default="", repr=False)  # a key with no limits at all
    main_sha256: str = ""  # keys.yaml's key_sha256 of `main`


def _key_entry(name: str, secret: str, i: int) -> str:
    lines = [f"  {name}:", f'    key_sha256: "{hashlib.sha256(secret.encode()).hexdigest()}"']
    if i % 50 == 49:
        lines.append("    enabled: false")
    if i % 13 == 3:
        lines.append("    expires_at: 2031-01-01")
    if i % 7 == 2:
        lines.append('    models: ["llama3.2:*", "gpt-4o-mini"]')
    if i % 11 == 5:
        lines.append("    scopes: [inference, models, admin]")
    if i % 17 == 4:
        lines.append('    allow_ips: ["127.0.0.0/8", "::1"]')
    if i % 4 == 1:
        lines += [
            "    limits:",
            "      rpm: 600",
            "      concurrent: 8",
            "      tokens_per_day: 5000000",
        ]
    return "\n".join(lines) + "\n"


MAIN_ENTRY = """  bench-main:
    key_sha256: "{digest}"
    models: ["llama3.2:*", "qwen2.5:*", "gpt-4o-mini"]
    allow_ips: ["127.0.0.0/8", "::1"]
    expires_at: 2031-01-01
    limits:                 # high enough never to trigger during the bench
      rpm: 1000000
      tpm: 1000000000000
      concurrent: 100000
      requests_per_day: 1000000000
      tokens_per_day: 1000000000000
      tokens_total: 1000000000000000
"""


def make_keys(count: int) -> KeySet:
    main = "sk-bench-" + secrets.token_urlsafe(30)
    main_sha256 = hashlib.sha256(main.encode()).hexdigest()
    main_entry = MAIN_ENTRY.format(digest=main_sha256)
    head = "# keygate bench: generated keys (secrets are not kept)\nkeys:\n"
    names, parts = ["bench-main"], [head]
    for i in range(count - 1):
        name = f"user-{i:05d}"
        names.append(name)
        parts.append(_key_entry(name, "sk-" + secrets.token_urlsafe(36), i))
        if i == (count - 1) // 2:
            parts.append(main_entry)  # somewhere in the middle, as in a real file
    if count == 1:
        parts.append(main_entry)
    # A key without quotas: at start-up it is served before the usage counters are loaded.
    plain = "sk-bench-" + secrets.token_urlsafe(30)
    digest = hashlib.sha256(plain.encode()).hexdigest()
    parts.append(f'  bench-plain:\n    key_sha256: "{digest}"\n')
    names.append("bench-plain")
    return KeySet(count, main, "".join(parts), head + main_entry, names, plain, main_sha256)


def bench_keys(count: int) -> tuple[KeySet, dict]:
    """`count` keys, and the request header of the main one, which bench/minauth.py is
    also set up to accept (by its digest: no secret in the environment)."""
    keys = make_keys(count)
    os.environ["MINAUTH_KEY_SHA256"] = keys.main_sha256
    return keys, {"Authorization": f"Bearer {keys.main_secret}"}


def gateway_toml(upstream: str) -> str:
    return f"""# keygate bench: three channels on one fake upstream
[gateway]
usage_log = "logs/usage.jsonl"

[[channels]]
name = "gpu-a"
kind = "ollama"
base_url = "{upstream}"
models = ["llama3.2:*", "qwen2.5:*"]
priority = 10
weight = 3

[[channels]]
name = "gpu-b"
kind = "ollama"
base_url = "{upstream}"
models = ["llama3.2:*", "nomic-embed-text:*"]
priority = 10
weight = 1

[[channels]]
name = "spare"
kind = "ollama"
base_url = "{upstream}"
models = ["*"]
priority = 0
[channels.model_map]
"gpt-4o-mini" = "qwen2.5:7b"
"""


def keygate_dir(path: Path, upstream: str, keys_yaml: str) -> Path:
    """A folder with gateway.toml, keys.yaml and logs/; returns gateway.toml's path."""
    (path / "logs").mkdir(parents=True, exist_ok=True)
    (path / "keys.yaml").write_text(keys_yaml)
    config = path / "gateway.toml"
    config.write_text(gateway_toml(upstream))
    return config
