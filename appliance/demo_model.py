"""A tiny random-weight causal LM, made here with no download: the demo's and the engine tests' model.

A byte-level BPE tokenizer is trained on a few paragraphs shipped below, a Llama-shaped
model of about 0.2 M parameters is initialised from a seed, and both are saved in the
standard Hugging Face layout (config.json, tokenizer.json, chat template, safetensors),
so any engine that loads a local folder can serve it — on CPU in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from appliance.errors import ApplianceError

_CORPUS = """\
The appliance serves models on one box. Drop in a model folder, get a URL and a key.
Each endpoint has replicas; each replica is a worker process pinned to its GPUs.
Health checks probe every replica; only healthy replicas receive requests.
The gateway speaks the OpenAI API: chat completions, completions, embeddings and models.
Autoscaling adds replicas when GPUs are hot or latency grows, and removes them when idle.
Hello! How can I help you today? Tell me about the weather, numbers 0 1 2 3 4 5 6 7 8 9.
A quick brown fox jumps over the lazy dog. Questions, answers, lists: one, two, three.
"""

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

# ChatML-style: the format most chat templates in the wild follow.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_demo_model(folder: Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as exc:
        raise ApplianceError(
            f"the demo model needs the transformers extra (pip install 'appliance[transformers]'): {exc}",
            code="missing_dependency",
        ) from None

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
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown input
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,  # head_dim 64: vLLM's CPU attention needs head_dim ≥ 32
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|pad|>"],
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[ids["<|im_end|>"], ids["<|eos|>"]],
        pad_token_id=config.pad_token_id,
        max_new_tokens=32,
        do_sample=False,
    )
    model.save_pretrained(folder, safe_serialization=True)
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; a worker running as another user must read it
    (folder / "appliance-demo.json").write_text(json.dumps({"kind": "appliance demo model", "seed": seed, "weights": "random"}) + "\n")
    return folder


def is_current_demo_model(folder: Path) -> bool:
    """A demo model folder this version wrote (older ones had head_dim 16, which vLLM's CPU attention refuses)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        return int(config["hidden_size"]) // int(config["num_attention_heads"]) >= 32
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return False


def write_demo_config(state_dir: Path, model_folder: Path, *, port: int, engine: str = "transformers") -> Path:
    """A config that serves the demo model on CPU with `engine`: transformers (starts in seconds) or
    vllm (vLLM's CPU build; about a minute)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "config.toml"
    path.write_text(
        "# Written by `appliance demo`.\n"
        "[server]\n"
        f"port = {port}\n"
        f'state_dir = "{state_dir}"\n\n'
        "[gpus]\n"
        'devices = "none"\n\n'
        "[[endpoints]]\n"
        'name = "demo"\n'
        f'model_folder = "{model_folder}"\n'
        f'runtime = "{engine}"\n'
        + ('environ = { VLLM_CPU_KVCACHE_SPACE = "1" }\n' if engine == "vllm" else "")
        + f'description = "tiny random-weight demo model on CPU ({engine})"\n'
        "health_check = { path = \"/health\", interval = 1.0, max_retries = 5, max_wait_time = 5.0, initial_delay = 300.0 }\n"
    )
    return path
