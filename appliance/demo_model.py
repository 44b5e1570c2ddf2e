"""A tiny random-weight causal LM, made here with no download: the demo's and the engine tests' model.

A byte-level BPE tokenizer is trained on a few paragraphs shipped below, a Llama-shaped
model of about 0.15 M parameters is initialised from a seed, and both are saved in the
standard Hugging Face layout (config.json, tokenizer.json, chat template, safetensors),
so any engine that loads a local folder can serve it — on CPU in seconds.

Random weights alone answer whitespace (a random greedy pick lands on "\n" and stays there), which a
chat window shows as an empty bubble. So the output layer has rows only for the tokens that read as
words, numbers or punctuation; every other row (whitespace, bytes that are not text, special tokens)
is zero, so its logit is 0. The rows it has are drawn 50 times larger than Llama's initialisation, so
the best of their logits stands about 20 above 0: greedy decoding always picks visible text, and so
does sampling at temperature 1 (vLLM's default), but for a chance of about one in a million per token.
The answer is still noise, and it never ends before max_tokens.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_CORPUS = """\
The appliance serves models on one box. Drop in a model folder, get a URL and a key.
Each endpoint has replicas; each replica is a worker process pinned to its GPUs.
Health checks probe every replica; only healthy replicas receive requests.
The gateway speaks the OpenAI API: chat completions, completions, embeddings and models.
Autoscaling adds replicas when GPUs are hot or latency grows, and removes them when idle.
Hello! How can I help you today? Tell me about the weather, numbers 0 1 2 3 4 5 6 7 8 9.
A quick brown fox jumps over the lazy dog. Questions, answers, lists: one, two, three.
"""

# Bumped whenever the model changes in a way a demo already written must pick up (is_current_demo_model).
DEMO_VERSION = 4
# What an answer may be made of: whole words of the corpus below (after a space) and punctuation marks.
_PUNCTUATION = frozenset(".,!?:;")


SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

# ChatML-style: the format most chat templates in the wild follow.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The model's shape: Llama, head_dim 64 (vLLM's CPU attention needs head_dim ≥ 32), about 0.15 M parameters.
_SHAPE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
          "num_key_value_heads": 1, "max_position_embeddings": 512}


def write_demo_model(folder: Path, *, seed: int = 0, overwrite: bool = False, shape: Mapping[str, int] | None = None) -> Path:
    """Write the demo model to `folder`. Only tokenizers, safetensors and numpy are needed (all three come
    with the transformers extra): no torch or transformers import, so it takes a second, not ten."""
    try:
        import numpy as np
        from safetensors.numpy import save_file
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:
        raise ApplianceError(
            f"the demo model needs the transformers extra (pip install 'appliance[transformers]'): {exc}",
            code="missing_dependency",
        ) from None

    dims = {**_SHAPE, **(shape or {})}  # a larger shape keeps a GPU busy (scripts/bench_gpu.py); the tokenizer stays the same
    folder = folder.resolve()
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ApplianceError(f"{folder} is not empty; pass --force to overwrite it", code="folder_not_empty")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=dims["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown input
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "model_max_length": dims["max_position_embeddings"], "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    })
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    hidden, inner, vocab = dims["hidden_size"], dims["intermediate_size"], tok.get_vocab_size()
    heads, kv_heads = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = hidden // heads
    _write_json(folder / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **dims, "vocab_size": vocab, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.02, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False,  # the output layer is shaped below; the input embeddings stay whole
        "bos_token_id": ids["<|bos|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|pad|>"],
        "torch_dtype": "float32", "use_cache": True,
    })
    _write_json(folder / "generation_config.json", {
        "bos_token_id": ids["<|bos|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|eos|>"]], "pad_token_id": ids["<|pad|>"],
        "max_new_tokens": 32, "do_sample": False,
    })

    # Llama's initialisation: every matrix from N(0, 0.02), every norm 1 (weights as [out, in]).
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> Any:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for n in range(dims["num_hidden_layers"]):
        layer = f"model.layers.{n}"
        weights |= {
            f"{layer}.self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            f"{layer}.self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            f"{layer}.self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            f"{layer}.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            f"{layer}.mlp.gate_proj.weight": normal(inner, hidden),
            f"{layer}.mlp.up_proj.weight": normal(inner, hidden),
            f"{layer}.mlp.down_proj.weight": normal(hidden, inner),
            f"{layer}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{layer}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    keep = np.zeros((vocab, 1), np.float32)
    keep[visible_token_ids(tok)] = 50.0  # logits of about ±8 (the final norm's output has length 8): see above
    weights["lm_head.weight"] = normal(vocab, hidden) * keep
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "appliance-demo.json").write_text(json.dumps({"kind": "appliance demo model", "version": DEMO_VERSION, "seed": seed, "weights": "random"}) + "\n")
    for path in folder.iterdir():
        path.chmod(0o644)  # a worker running as another user must read them
    return folder


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def visible_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids of the tokens that decode to visible text: a whole word of the corpus after a space, or a punctuation mark."""
    words = {" " + w for w in re.findall(r"[A-Za-z0-9']+", _CORPUS)} | _PUNCTUATION
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    return [i for i in range(tokenizer.get_vocab_size()) if i not in special and tokenizer.decode([i]) in words]


def is_current_demo_model(folder: Path) -> bool:
    """A demo model folder this version wrote (older ones had head_dim 16, which vLLM's CPU attention refuses,
    or answered only whitespace)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        marker = json.loads((folder / "appliance-demo.json").read_text())
        return int(config["hidden_size"]) // int(config["num_attention_heads"]) >= 32 and marker.get("version") == DEMO_VERSION
    except (OSError, ValueError, KeyError, ZeroDivisionError, AttributeError):
        return False


def write_demo_config(state_dir: Path, model_folder: Path, *, port: int, engine: str = "transformers", workers_user: str | None = None) -> Path:
    """A config that serves the demo model on CPU with `engine`: transformers (starts in seconds) or
    vllm (vLLM's CPU build; about a minute). `workers_user` sets `[workers] user` (default: the appliance's)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "config.toml"
    path.write_text(
        "# Written by `appliance demo`.\n"
        "[server]\n"
        f"port = {port}\n"
        f'state_dir = "{state_dir}"\n\n'
        + (f"[workers]\nuser = {json.dumps(workers_user)}\n\n" if workers_user else "")
        + "[gpus]\n"
        'devices = "none"\n\n'
        "[[endpoints]]\n"
        'name = "demo"\n'
        f'model_folder = "{model_folder}"\n'
        f'runtime = "{engine}"\n'
        + ('environ = { VLLM_CPU_KVCACHE_SPACE = "1" }\n' if engine == "vllm" else "")
        + f'description = "tiny random-weight demo model on CPU ({engine})"\n'
        # Backend.AI's 10 s between probes: a starting replica is polled until its first pass anyway, so
        # the demo is ready as soon as its worker is, and its log is not a probe line a second.
        "health_check = { path = \"/health\", interval = 10.0, max_retries = 5, max_wait_time = 5.0, initial_delay = 300.0 }\n"
    )
    return path
