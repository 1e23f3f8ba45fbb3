"""The fake's endpoints, one mixin per API, combined into `fakeollama.FakeOllama`:

* `native.NativeAPI`: Ollama's own ``/api/*`` (NDJSON streams) and ``/``;
* `openai_compat.OpenAIAPI`: ``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/embeddings`` and ``/v1/models`` (SSE streams), also all that ``kind="openai"`` serves;
* `responses.ResponsesAPI`: ``/v1/responses`` (named SSE events);
* `anthropic_compat.AnthropicAPI`: the Anthropic-compatible ``/v1/messages`` (named SSE events);

and `common.Endpoints`, what they share: decoding a request body as Ollama does, the error
shape of a path's API, model lookups and the generated reply.
"""
