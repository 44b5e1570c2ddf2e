"""An engine runtime on a folder it cannot load is refused at create (422, saying what it needs),
not left to crash-loop into ERROR minutes later."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config())


def _engines() -> list[str]:
    return [r for r, module in (("vllm", "vllm"), ("transformers", "transformers")) if importlib.util.find_spec(module) is not None]


async def _create(admin: Admin, name: str, folder: Path, runtime: str, **extra: Any) -> tuple[int, Any]:
    body = {"name": name, "model_folder": str(folder), "runtime": runtime, "replicas": 0, **extra}
    status, answer = await admin.call("POST", "/api/v1/endpoints", json_body=body)
    return status, answer


@pytest.mark.parametrize("runtime", _engines())
async def test_a_folder_with_no_model_is_refused_with_what_the_runtime_needs(admin: Admin, tmp_path: Path, runtime: str) -> None:
    ghost = tmp_path / "ghost"
    ghost.mkdir()
    (ghost / "notes.txt").write_text("not a model")
    status, err = await _create(admin, "ghost", ghost, runtime)
    assert status == 422 and err["error"]["code"] == "model_file_required" and err["error"]["param"] == "model_folder", err
    message = err["error"]["message"]
    assert "config.json and weights (*.safetensors, *.bin or *.pt)" in message and str(ghost) in message
    assert "has no config.json and no weights" in message
    assert (await admin.call("GET", "/api/v1/endpoints/ghost"))[0] == 404  # nothing stored

    (ghost / "config.json").write_text("{}")
    status, err = await _create(admin, "ghost", ghost, runtime)
    assert status == 422 and "has no weights" in err["error"]["message"] and "no config.json" not in err["error"]["message"]

    (ghost / "model.safetensors").write_bytes(b"")
    status, created = await _create(admin, "ghost", ghost, runtime)
    assert status == 201, created


async def test_vllm_takes_the_model_named_in_extra_args(admin: Admin, tmp_path: Path) -> None:
    if "vllm" not in _engines():
        pytest.skip("vllm is not installed")
    empty = tmp_path / "empty"
    empty.mkdir()
    status, err = await _create(admin, "hub", empty, "vllm")
    assert status == 422 and "--model" in err["error"]["message"]
    for name, args in (("hub", ["--model", "Qwen/Qwen2.5-0.5B-Instruct"]), ("hub2", ["--max-model-len", "512", "--model=/srv/models/qwen"])):
        status, created = await _create(admin, name, empty, "vllm", extra_args=args)
        assert status == 201, created
    status, err = await _create(admin, "hub3", empty, "vllm", extra_args=["--model"])  # a flag with no value names nothing
    assert status == 422


async def test_a_gguf_folder_is_pointed_to_llama_cpp(admin: Admin, tmp_path: Path) -> None:
    if not _engines():
        pytest.skip("no engine runtime installed")
    folder = tmp_path / "q4"
    folder.mkdir()
    (folder / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    status, err = await _create(admin, "q4", folder, _engines()[0])
    assert status == 422 and "runtime 'llama-cpp' serves those" in err["error"]["message"]
