"""What the fake model "generates": the prompt it counts, the reply it gives, its metrics and
its embeddings, all deterministic.

Determinism rules (tests compute expected numbers from these)
--------------------------------------------------------------
* ``count_tokens(text)`` is the number of whitespace-separated words in ``text``, and at
  least 1 when ``text`` is not empty (so ``""`` counts 0 and ``" "`` counts 1).
* **Prompt tokens** = ``count_tokens`` of the non-empty prompt texts of the request joined
  with single spaces. The prompt texts are: ``system`` and ``prompt`` (``/api/generate``,
  ``/v1/completions``); every message's ``content`` (``/api/chat``,
  ``/v1/chat/completions``, ``/v1/messages``: a string, or the ``text`` of each content
  part/block) plus Anthropic's ``system``; ``instructions`` and ``input`` (a string, or the
  text/content/output strings of its items) on ``/v1/responses``; the ``input`` string(s)
  on ``/api/embed`` and ``/v1/embeddings``.
* **The reply** is ``chunks`` pieces (default 5), piece ``i`` being
  ``REPLY_WORDS[i % len(REPLY_WORDS)] + " "``: "Hello ", "from ", "the ", "fake ", "model ",
  "this ", ... **Completion tokens** = the number of pieces.
* A token limit smaller than ``chunks`` cuts the reply to that many pieces and the
  finish reason becomes ``"length"`` (Anthropic: ``"max_tokens"``); otherwise it is
  ``"stop"`` (``"end_turn"``). Limits: ``options.num_predict`` (native), ``max_tokens``
  (chat/completions/messages), ``max_output_tokens`` (responses). Negative limits mean
  "no limit", as in Ollama.
* A streamed reply sends one content piece per step, then a final step (native: the
  ``done:true`` line with the counts; SSE: finish/usage frames and ``[DONE]``).
  ``chunk_delay`` seconds pass between steps, not before the first.
* An empty ``prompt`` (generate) or ``messages`` (chat) is a "load the model" call: one
  JSON object with ``done_reason: "load"`` (``"unload"`` with ``keep_alive: 0``).
* Embeddings have ``EMBED_DIM`` (64) dimensions unless ``dimensions`` asks otherwise; the
  values are derived from a hash of the text and L2-normalised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

from .wire import is_int

DEFAULT_CHUNKS = 5
EMBED_DIM = 64
REPLY_WORDS = (
    "Hello", "from", "the", "fake", "model", "this", "reply", "is", "deterministic",
    "and", "every", "word", "counts", "as", "one", "token",
)


def count_tokens(text: str) -> int:
    """Words in ``text``; at least 1 for any non-empty text."""
    words = len(text.split())
    return words if words else (1 if text else 0)


def texts(value: Any) -> list[str]:
    """Prompt text inside a content value: a string, or parts/blocks/items holding text."""
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                for key in ("text", "content", "output"):
                    out.extend(texts(part.get(key)))
    return out


def message_texts(messages: Any) -> list[str]:
    out: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            out.extend(texts(message.get("content")))
    return out


@dataclasses.dataclass
class Turn:
    """One generated reply: what every inference endpoint formats in its own shape."""

    model: str  # the request's model string, echoed back unchanged
    prompt_tokens: int
    pieces: list[str]
    done_reason: str  # "stop" | "length" | "load" | "unload"
    started_ns: int = dataclasses.field(default_factory=time.monotonic_ns)

    @classmethod
    def generate(cls, model: str, prompt_texts: list[Any], chunks: int, limit: Any = None) -> Turn:
        """The deterministic reply to a request (see the module docstring)."""
        prompt = " ".join(t for t in prompt_texts if isinstance(t, str) and t)
        count, reason = max(chunks, 0), "stop"
        if is_int(limit) and 0 <= limit < count:
            count, reason = limit, "length"
        pieces = [REPLY_WORDS[i % len(REPLY_WORDS)] + " " for i in range(count)]
        return cls(model, count_tokens(prompt), pieces, reason)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def metrics(self) -> dict:
        """Ollama's final-chunk metrics: integer nanoseconds and the two counts."""
        load = 1_250_000
        prompt_eval = 40_000 * max(self.prompt_tokens, 1)
        elapsed = time.monotonic_ns() - self.started_ns
        evaluation = (max(elapsed - load - prompt_eval, 0)
                      + 1_000_000 * max(self.completion_tokens, 1))
        return {
            "total_duration": load + prompt_eval + evaluation,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt_eval,
            "eval_count": self.completion_tokens,
            "eval_duration": evaluation,
        }


def embed_dims(value: Any) -> int:
    """The vector size a request's ``dimensions`` asks for: EMBED_DIM unless a positive int."""
    return value if is_int(value) and value > 0 else EMBED_DIM


def embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        raw.extend(b / 127.5 - 1.0 for b in digest)
        counter += 1
    raw = raw[:dims]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 7) for x in raw]
