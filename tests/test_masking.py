"""Masking of secret-looking values (appliance.security.vault): command lines, string commands and
environ names, in responses and events, and masked values sent back keep the stored ones."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Admin, async_wait_for
from test_supervisor import FAKE, WORKERS, replicas

from appliance.api.services import SERVICES
from appliance.errors import ApplianceError
from appliance.security.vault import MASK, mask_argv, mask_environ, masked, restore_masked, secret_name, unmask_argv

M = MASK


@pytest.mark.parametrize(("argv", "shown"), [
    (["x", "--api-key", "sk-1", "--hf-token=hf_2", "--max-model-len", "4096", "--db-password", "p"],
     ["x", "--api-key", M, f"--hf-token={M}", "--max-model-len", "4096", "--db-password", M]),
    (["bash", "-c", "vllm serve /m --api-key sk-1 --port 8000"], ["bash", "-c", f"vllm serve /m --api-key {M} --port 8000"]),
    (["python serve.py --hf-token abc --port 8000"], [f"python serve.py --hf-token {M} --port 8000"]),
    (["python serve.py --hf-token=abc"], [f"python serve.py --hf-token={M}"]),
    (['bash -c "vllm serve --api-key sk-1" && echo "done"'], [f'bash -c "vllm serve --api-key {M}" && echo "done"']),
    (["sh", "-c", "serve --token 'a b' --secret \"c d\"; next"], ["sh", "-c", f"serve --token '{M}' --secret \"{M}\"; next"]),
    (["bash -c 'serve --token \"a b\" --x' --y"], [f"bash -c 'serve --token \"{M}\" --x' --y"]),
    (["sh", "-c", "HF_TOKEN=hf_1 TOKENIZERS_PARALLELISM=false exec serve; export DB_PASSWORD=pw && run"],
     ["sh", "-c", f"HF_TOKEN={M} TOKENIZERS_PARALLELISM=false exec serve; export DB_PASSWORD={M} && run"]),
    (["env", "OPENAI_API_KEY=sk-1", "HF_HOME=/cache", "python"], ["env", f"OPENAI_API_KEY={M}", "HF_HOME=/cache", "python"]),
    (["python serve.py --hf-token", "abc", "--x"], ["python serve.py --hf-token", M, "--x"]),  # a flag ending a string: its value follows
])
def test_secret_values_are_masked_and_the_rest_is_kept(argv: list[str], shown: list[str]) -> None:
    assert mask_argv(argv) == shown
    assert mask_argv(shown) == shown  # masking what is shown changes nothing
    assert unmask_argv(shown, argv, param="command") == argv  # sent back as shown: the stored values again


def test_ordinary_arguments_are_not_masked() -> None:
    argv = ["vllm", "serve", "--max-tokens", "10", "--tokenizer", "meta/llama", "--max-num-batched-tokens", "8192", "-p", "8",
            "python -c \"import sys; print('--api-key', sys.argv)\"", "http://h/?token=x"]
    assert mask_argv(argv) == argv


def test_secret_looking_environ_names() -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "PGPASSWORD", "JWT_SECRET",
                 "NGC_API_KEY", "WANDB_KEY", "MYSQL_PWD", "SSH_PASS", "hf_token"):
        assert secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "MAX_TOKENS", "PWD", "PATH", "HF_HOME", "VLLM_LOGGING_LEVEL", "PASSTHROUGH", "KEYBOARD"):
        assert not secret_name(name), name
    assert mask_environ({"HF_TOKEN": "hf_1", "HF_HOME": "/c"}) == {"HF_TOKEN": M, "HF_HOME": "/c"}


def test_masked_covers_every_field() -> None:
    record = {"environ": {"HF_TOKEN": "hf_1", "A": "1"}, "secret_environ": {"S": "fernet:x"}, "extra_args": ["--api-key", "k"],
              "command": ["sh", "-c", "serve --hf-token t"], "replicas": 2}
    assert masked(record) == {"environ": {"HF_TOKEN": M, "A": "1"}, "secret_environ": {"S": M}, "extra_args": ["--api-key", M],
                              "command": ["sh", "-c", f"serve --hf-token {M}"], "replicas": 2}
    assert record["environ"]["HF_TOKEN"] == "hf_1"  # the record itself is left alone


def test_masked_values_sent_back_are_the_stored_ones() -> None:
    row = {"spec": {"environ": {"HF_TOKEN": "hf_1", "A": "1"}, "extra_args": ["--api-key", "k1", "--api-key", "k2"],
                    "command": ["sh", "-c", "serve --hf-token t --port 1"]},
           "config": {"environ": {"HF_TOKEN": "hf_1", "A": "1", "FOLDER_SECRET": "f"}}}
    sent = {"environ": {"HF_TOKEN": M, "A": "2", "FOLDER_SECRET": M}, "extra_args": ["--x", "--api-key", M, "--api-key", M],
            "command": ["sh", "-c", f"serve --hf-token {M} --port 2"]}
    assert restore_masked(sent, row) == {
        "environ": {"HF_TOKEN": "hf_1", "A": "2"},  # the folder's secret is the folder's again
        "extra_args": ["--x", "--api-key", "k1", "--api-key", "k2"],  # matched by flag, in order, wherever they moved
        "command": ["sh", "-c", "serve --hf-token t --port 2"],
    }
    assert restore_masked({"environ": {"HF_TOKEN": "new"}, "extra_args": ["--api-key", "k3"]}, row) == {}  # new values are new values
    assert restore_masked({"environ": {"PLAIN": M}}, None) == {}  # never masked: taken as written
    for bad in ({"environ": {"NEW_TOKEN": M}}, {"extra_args": ["--hf-token", M]}, {"command": ["sh", "-c", f"serve --token {M}"]}):
        with pytest.raises(ApplianceError) as exc:
            restore_masked(bad, row)
        assert exc.value.code == "invalid_secret" and exc.value.status == 422


# Through the admin API, with fake workers in-process.

PY = sys.executable
SECRETS = ("hf_live_Str1ng", "sk-envSecret-9", "hf-env-T0ken")


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS}))


async def _stored(admin: Admin, name: str) -> dict[str, Any]:
    row = await admin.client.app[SERVICES].store.endpoints.get(name)
    assert row is not None
    return row


async def _env(admin: Admin, name: str, generation: int) -> dict[str, str] | None:
    """The environment of the endpoint's HEALTHY worker of `generation` (None until it is the only one left)."""
    reps = [r for r in await replicas(admin, name) if r["state"] != "TERMINATED"]
    if [(r["generation"], r["state"]) for r in reps] != [(generation, "HEALTHY")]:
        return None
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{reps[0]['port']}/whoami") as resp:
        env: dict[str, str] = (await resp.json())["env"]
        return env


async def test_string_commands_and_environ_are_masked_and_sent_back_masked_keep_their_values(admin: Admin, tmp_path: Path) -> None:
    hf, key, env_token = SECRETS
    command = ["/bin/sh", "-c", f"exec python3 serve.py --hf-token {hf} --port 8000"]
    status, shell = await admin.call("POST", "/api/v1/endpoints", json_body={
        "name": "shell", "model_folder": str(tmp_path), "runtime": "cmd", "replicas": 0, "command": command,
        "environ": {"HF_TOKEN": env_token, "HF_HOME": "/cache"}})
    assert status == 201, shell
    shown_command = ["/bin/sh", "-c", f"exec python3 serve.py --hf-token {M} --port 8000"]
    for view in (shell, shell["spec"]):
        assert view["command"] == shown_command and view["environ"] == {"HF_TOKEN": M, "HF_HOME": "/cache"}

    status, run = await admin.call("POST", "/api/v1/endpoints", json_body={
        "name": "run", "model_folder": str(tmp_path), "runtime": "cmd", "command": [PY, str(FAKE), "--port", "8000"],
        "environ": {"FAKE_API_KEY": key, "FAKE_PLAIN": "p"}})
    assert status == 201 and run["environ"] == {"FAKE_API_KEY": M, "FAKE_PLAIN": "p"}, run
    env = await async_wait_for(lambda: _env(admin, "run", run["generation"]), timeout=20, what="run's worker")
    assert env["FAKE_API_KEY"] == key  # the worker gets the real value

    # sent back as shown: stored as before, nothing restarts
    status, same = await admin.call("PATCH", "/api/v1/endpoints/shell", json_body={"command": shell["command"], "environ": shell["environ"]})
    assert status == 200 and same["generation"] == shell["generation"], same
    row = await _stored(admin, "shell")
    assert row["spec"]["command"] == command and row["config"]["command"] == command and row["spec"]["environ"]["HF_TOKEN"] == env_token
    # another part changed around a masked value: that change only
    edited = [*shown_command[:2], shown_command[2].replace("8000", "8001")]
    status, changed = await admin.call("PATCH", "/api/v1/endpoints/shell", json_body={"command": edited})
    assert status == 200 and changed["generation"] == shell["generation"] + 1 and changed["command"] == edited
    assert (await _stored(admin, "shell"))["config"]["command"][2] == f"exec python3 serve.py --hf-token {hf} --port 8001"
    status, body = await admin.call("PATCH", "/api/v1/endpoints/shell", json_body={"environ": {"NEW_TOKEN": M}})
    assert status == 422 and body["error"]["code"] == "invalid_secret" and body["error"]["param"] == "environ"

    # the worker's environment after a roll: the masked value sent back, the real one
    status, rolled = await admin.call("PATCH", "/api/v1/endpoints/run", json_body={"environ": {**run["spec"]["environ"], "FAKE_PLAIN": "q"}})
    assert status == 200 and rolled["generation"] == run["generation"] + 1, rolled
    env = await async_wait_for(lambda: _env(admin, "run", rolled["generation"]), timeout=20, what="run's new worker")
    assert env["FAKE_API_KEY"] == key and env["FAKE_PLAIN"] == "q"

    texts = [str(await admin.call("GET", path)) for path in ("/api/v1/endpoints", "/api/v1/endpoints/shell", "/api/v1/events?limit=1000")]
    for text in texts:
        assert not [s for s in SECRETS if s in text]
