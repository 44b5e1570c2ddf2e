"""Which of an engine's own routes a caller with an inference key may reach through the gateway.

Engines serve more than inference on their port: vLLM also answers /sleep, /wake_up,
/reset_prefix_cache, /collective_rpc, /scale_elastic_ep and LoRA loading; llama-server
/slots and /lora-adapters; SGLang /flush_cache and weight updates. Those act on the engine
(and so on every caller), so they take an admin key. A `custom` or `cmd` server is the
user's own: every route of it is passed through.
"""

from __future__ import annotations

# OpenAI-compatible inference, shared by every engine runtime.
_OPENAI = frozenset({
    "v1/chat/completions", "v1/completions", "v1/embeddings", "v1/models", "v1/responses", "health",
})

INFERENCE_ROUTES: dict[str, frozenset[str]] = {
    "vllm": _OPENAI | {
        "v1/audio/transcriptions", "v1/audio/translations", "v1/rerank", "v2/rerank", "rerank", "v1/score", "score",
        "pooling", "classify", "tokenize", "detokenize", "version", "ping", "invocations",
    },
    "sglang": _OPENAI | {"generate", "encode", "classify", "v1/rerank", "tokenize", "detokenize", "get_model_info", "health_generate"},
    "nim": _OPENAI | {"v1/health/ready", "v1/health/live", "v1/metadata", "v1/version"},
    "huggingface-tgi": _OPENAI | {"generate", "generate_stream", "info", "tokenize", "invocations"},
    "modular-max": _OPENAI,
    "llama-cpp": _OPENAI | {
        "completion", "completions", "embedding", "embeddings", "rerank", "reranking", "v1/rerank", "infill", "tokenize",
        "detokenize", "apply-template",
    },
    "transformers": _OPENAI | {"v1/audio/transcriptions"},
}


def is_inference_route(runtime: str, path: str) -> bool:
    """`path` is the request path at the engine (leading slash, no query). Runtimes without a list
    (custom, cmd) pass everything."""
    routes = INFERENCE_ROUTES.get(runtime)
    if routes is None:
        return True
    route = path.split("?", 1)[0].strip("/")
    if any(part in ("", ".", "..") for part in route.split("/")):
        return False  # `v1/responses/../../sleep` must not pass for a response id: no dot or empty segments
    return route in routes or route.startswith("v1/responses/")
