"""GPU memory claims (pure): what a replica's model needs in GPU memory, estimated from the parsed
safetensors headers and config.json, and the claim placement counts against each GPU's budget.

The estimate is weights + KV cache at the model's longest context; the claim adds a stated overhead
([gpus] claim_overhead: CUDA context, activations, CUDA graphs). A stated `resources.gpu_memory`
replaces the estimate, and with neither the claim is the replica's share of the GPU's budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from appliance.domain.specs import MemoryEstimate, Resources

# safetensors dtypes → bytes per element (F4 and F6 packed types count as one byte: an upper bound).
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "F6_E2M3": 1, "F6_E3M2": 1, "F4": 1,
}
# config.json torch_dtype / vLLM's --dtype and --kv-cache-dtype → bytes per element
_TORCH_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float64": 8}


def fmt_bytes(n: float) -> str:
    """Bytes as people read memory sizes: '30 GiB', '23.5 GiB', '412.3 MiB'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} B"


def tensor_bytes(header: Mapping[str, Any]) -> int:
    """The bytes of the tensors one safetensors header describes (shape × dtype; the header's own offsets
    for a dtype not listed)."""
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, Mapping):
            continue
        size = DTYPE_BYTES.get(str(tensor.get("dtype")))
        if size is not None:
            total += math.prod(int(d) for d in tensor.get("shape", [])) * size
        else:
            begin, end = tensor.get("data_offsets", (0, 0))
            total += int(end) - int(begin)
    return total


def _arg(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag v` or `--flag=v` (the last one wins, as argparse reads it)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # multimodal models keep the language model's shape under text_config
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) and "num_hidden_layers" in inner else config


def kv_cache(config: Mapping[str, Any], extra_args: Sequence[str] = ()) -> tuple[int, int] | None:
    """(bytes, max_model_len) of one sequence's KV cache at the model's longest context:
    2 (K and V) × layers × kv heads × head_dim × bytes per element × max_model_len. None when
    config.json does not give the shape."""
    c = _text_config(config)
    try:
        layers = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
        stated = _arg(extra_args, "--max-model-len")
        length = int(stated) if stated is not None else int(c.get("max_position_embeddings") or config["max_position_embeddings"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    dtype = _arg(extra_args, "--kv-cache-dtype")
    if dtype in (None, "auto"):
        dtype = _arg(extra_args, "--dtype")
    if dtype in (None, "auto"):
        dtype = str(c.get("torch_dtype") or config.get("torch_dtype") or c.get("dtype") or "float16")
    per = _TORCH_BYTES.get(dtype.lower().removeprefix("torch."), 2)
    return 2 * layers * kv_heads * head_dim * per * length, length


def estimate(headers: Iterable[Mapping[str, Any]], config: Mapping[str, Any] | None, extra_args: Sequence[str] = ()) -> MemoryEstimate | None:
    """Weights from the safetensors headers, KV cache from config.json; None with no weights."""
    weights = sum(tensor_bytes(h) for h in headers)
    if weights <= 0:
        return None
    kv = kv_cache(config, extra_args) if config is not None else None
    return MemoryEstimate(weights=weights, kv_cache=kv[0] if kv else 0, max_model_len=kv[1] if kv else None)


def need(resources: Resources, estimate: MemoryEstimate | None, overhead: int) -> int | None:
    """The estimate plus the overhead, for a replica that asks for a GPU (whole or a share); None otherwise."""
    if (resources.gpus or resources.gpu_share is not None) and estimate is not None:
        return estimate.weights + estimate.kv_cache + overhead
    return None


def claim(resources: Resources, estimate: MemoryEstimate | None, overhead: int) -> int | None:
    """Bytes of GPU memory one replica claims at least (on its GPUs together when it holds several whole
    ones): the stated gpu_memory, else its need (a share claims share × the GPU's budget when that is more);
    None: only its share of the budget, decided where it is placed."""
    return resources.gpu_memory if resources.gpu_memory is not None else need(resources, estimate, overhead)


def host_claim(resources: Resources, estimate: MemoryEstimate | None, overhead: int) -> int | None:
    """Host memory one replica claims where host memory is counted: resources.mem, else the estimate plus the overhead."""
    if resources.mem:
        return int(resources.mem)
    return estimate.weights + estimate.kv_cache + overhead if estimate is not None else None


def budget(memory_total: int, reserve: int) -> int:
    """What the appliance hands out of one GPU: NVML's total less the configured reserve."""
    return max(0, memory_total - reserve)
