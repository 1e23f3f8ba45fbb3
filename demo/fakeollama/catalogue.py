"""The model catalogue: which models the fake has "installed", their digests and details,
which it has "loaded" (``/api/ps``), and the blobs uploaded to it.

Names match as Ollama matches them: case-insensitively, with ``:latest`` as the default tag,
and a model is listed under its full name (``:latest`` included). Everything about a model
(digest, size, family, parameter size, quantisation, whether it embeds) is derived from its
name, so it is the same on every run. The first configured model has a fixed
``modified_at``, and each later one is an hour older, so the configured order is also
``/api/tags``' newest-first order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from typing import Iterable

from .wire import rfc3339

DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5:7b", "nomic-embed-text:latest")

# Fixed "modified_at" of the first configured model; later ones are an hour older each,
# so the configured order is also /api/tags' newest-first order.
_EPOCH_NS = 1746405464_706015396


def name_digest(name: str) -> str:
    """The hex sha256 the fake gives a model name (its digest, its pull/push layers)."""
    return hashlib.sha256(name.encode()).hexdigest()


@dataclasses.dataclass
class Model:
    name: str
    modified_ns: int

    @property
    def digest(self) -> str:
        return name_digest(self.name)

    @property
    def embedding(self) -> bool:
        return "embed" in self.name.split("/")[-1]

    @property
    def size(self) -> int:
        return 250_000_000 + int(self.digest[:7], 16) * 100

    @property
    def family(self) -> str:
        if self.embedding:
            return "nomic-bert"
        base = self.name.split("/")[-1].split(":")[0]
        match = re.match(r"[a-z]+", base.lower())
        return match.group(0) if match else "llama"

    @property
    def details(self) -> dict:
        tag = self.name.rsplit(":", 1)[-1]
        size = re.fullmatch(r"(\d+(?:\.\d+)?)b", tag.lower())
        if size:
            parameter_size = f"{size.group(1)}B"
        else:
            parameter_size = "137M" if self.embedding else "3.2B"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": parameter_size,
            "quantization_level": "F16" if self.embedding else "Q4_K_M",
        }

    def tag_entry(self) -> dict:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": rfc3339(self.modified_ns),
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


def full_name(name: str) -> str:
    """The name as Ollama lists it: the tag defaults to "latest"."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def model_key(name: str) -> str:
    """Ollama matches names case-insensitively, with ":latest" as the default tag."""
    key = name.strip().lower()
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key


def owned_by(name: str) -> str:
    """The namespace Ollama's model.ParseName finds: "library" for plain names."""
    parts = name.split(":")[0].split("/")
    return "library" if len(parts) == 1 else parts[-2]


class Catalogue:
    """The installed models, the loaded ones, and the uploaded blobs (event-loop thread only)."""

    def __init__(self, names: Iterable[str]):
        self.models = {
            model_key(m): Model(m, _EPOCH_NS - i * 3_600_000_000_000) for i, m in enumerate(names)
        }
        self.loaded: dict[str, int] = {}  # model key -> last use (ns), for /api/ps
        self.blobs: set[str] = set()

    def lookup(self, name: str) -> Model | None:
        return self.models.get(model_key(name)) if name else None

    def newest_first(self) -> list[Model]:
        return sorted(self.models.values(), key=lambda m: m.modified_ns, reverse=True)

    def add(self, name: str) -> None:
        # Ollama lists what it stores under the full name, ":latest" included.
        self.models[model_key(name)] = Model(full_name(name), time.time_ns())

    def delete(self, name: str) -> None:
        self.models.pop(model_key(name), None)
        self.loaded.pop(model_key(name), None)

    def mark_loaded(self, model: Model) -> None:
        self.loaded[model_key(model.name)] = time.time_ns()

    def running(self) -> list[tuple[Model, int]]:
        """The loaded models that are still installed, with their last use, latest first."""
        out = []
        for key, used_ns in sorted(self.loaded.items(), key=lambda kv: kv[1], reverse=True):
            model = self.models.get(key)
            if model is not None:
                out.append((model, used_ns))
        return out
