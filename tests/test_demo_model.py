"""The tiny demo model: made locally, loaded by transformers, served by a real engine on CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "model"
    result = run_cli("demo-model", str(folder))
    assert result.returncode == 0, result.stderr
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_model_folder_is_complete_and_loads(demo_folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in demo_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in demo_folder.iterdir())  # readable by a worker user
    tokenizer = AutoTokenizer.from_pretrained(demo_folder)
    model = AutoModelForCausalLM.from_pretrained(demo_folder)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4 or tokenizer.eos_token_id in out[0].tolist()
    text = tokenizer.decode(prompt["input_ids"][0])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("prompt", ["Hello", "What is the weather like?", "hi", "Tell me about GPUs, please."])
def test_the_demo_model_answers_visible_words_not_whitespace(demo_folder: Path, prompt: str) -> None:
    """Greedy decoding of random weights used to land on "\n" and stay there: an empty bubble in a chat window."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.demo_model import _CORPUS

    tokenizer = AutoTokenizer.from_pretrained(demo_folder)
    model = AutoModelForCausalLM.from_pretrained(demo_folder)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0][inputs["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert len(new) == 12 and len(text.split()) >= 4, repr(text)  # words, every step
    assert all(tokenizer.decode([t]).strip() for t in new), repr(text)  # no token that shows nothing
    # vLLM samples at temperature 1 unless told otherwise: words all the same
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)[0][inputs["input_ids"].shape[1]:]
    words = set(re.findall(r"[A-Za-z0-9']+", _CORPUS)) | set(".,!?:;")
    assert all(tokenizer.decode([t]).strip() in words for t in sampled.tolist()), repr(tokenizer.decode(sampled))


def test_a_demo_model_written_before_visible_answers_is_made_again(demo_folder: Path, tmp_path: Path) -> None:
    from appliance.demo_model import is_current_demo_model

    assert is_current_demo_model(demo_folder)
    old = tmp_path / "old"
    shutil.copytree(demo_folder, old)
    marker = json.loads((old / "appliance-demo.json").read_text())
    del marker["version"]
    (old / "appliance-demo.json").write_text(json.dumps(marker))
    assert not is_current_demo_model(old)


def test_demo_model_is_deterministic_and_refuses_to_overwrite(demo_folder: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert run_cli("demo-model", str(again)).returncode == 0
    assert (again / "model.safetensors").read_bytes() == (demo_folder / "model.safetensors").read_bytes()
    result = run_cli("demo-model", str(again))
    assert result.returncode == 1 and "not empty; pass --force" in result.stderr
    assert run_cli("demo-model", str(again), "--force", "--seed", "1").returncode == 0
    assert (again / "model.safetensors").read_bytes() != (demo_folder / "model.safetensors").read_bytes()


def test_transformers_serve_serves_the_demo_model_on_cpu(demo_folder: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    assert exe, "the transformers CLI is installed with the transformers extra"
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([exe, "serve", str(demo_folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=120, interval=0.25, what="transformers serve /health")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(model=str(demo_folder), messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.usage is not None and reply.usage.completion_tokens <= 5 and reply.usage.prompt_tokens > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_appliance_demo_starts_with_the_demo_endpoint_declared(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "demo", "--state-dir", str(state), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:

        def ready() -> str | None:
            assert proc.poll() is None, "".join(printed)
            try:
                url = json.loads((state / "server.json").read_text())["url"]
                with urllib.request.urlopen(url + "/readyz", timeout=2):
                    return str(url)
            except (OSError, ValueError, KeyError):
                return None

        url = wait_for(ready, timeout=120, interval=0.2, what="appliance demo to be ready")
        key = (state / "admin.key").read_text().strip()
        req = urllib.request.Request(url + "/api/v1/endpoints/demo", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            ep = json.loads(resp.read())
        assert ep["runtime"] == "transformers" and ep["model_folder"] == str(state / "models" / "demo") and ep["source"] == "config"
        assert (state / "models" / "demo" / "model.safetensors").exists()
        wait_for(lambda: any(line.startswith("demo: ready:") for line in printed), timeout=120, what="the demo's ready line")
        text = "".join(printed)
        assert f"curl -s {url}/v1/chat/completions" in text and f'base_url="{url}/v1"' in text  # the port the server took
        # the printed export line makes the CLI work verbatim in another shell
        export = next(line for line in printed if line.strip().startswith("export PATH="))
        shell = subprocess.run(["bash", "-c", f"{export.strip()}; cd /; appliance endpoint list --json"], capture_output=True, text=True, timeout=60, check=False,
                               env={k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"})
        assert shell.returncode == 0, shell.stderr
        assert [e["name"] for e in json.loads(shell.stdout)["data"]] == ["demo"]
        # a second demo on the same state dir stops at once and leaves this one alone
        second = subprocess.run([sys.executable, "-m", "appliance", "demo", "--state-dir", str(state), "--port", "0"], capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode != 0 and "another appliance is already running with state_dir" in second.stderr and "Traceback" not in second.stderr
        with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
