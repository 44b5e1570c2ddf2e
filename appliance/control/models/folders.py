"""Backend.AI files read from a model folder (blocking: call off the event loop). The parsing
and validation are pure, in domain.definitions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from appliance.domain.definitions import DEFINITION_NAMES, SERVICE_DEFINITION_NAME, ModelDefinition, ServiceDefinition, parse_model_definition, parse_service_definition
from appliance.errors import ApplianceError


def find_definition_file(folder: Path, name: str | None) -> Path | None:
    """The model definition in `folder`: the named one (must exist) or a default name."""
    if name:
        candidate = folder / name
        if not candidate.is_file():
            raise ApplianceError(
                f"model definition file {name!r} not found in {folder}",
                status=422,
                code="definition_not_found",
                param="definition_file",
            )
        return candidate
    return next((folder / n for n in DEFINITION_NAMES if (folder / n).is_file()), None)


def load_model_definition(path: Path) -> ModelDefinition:
    return parse_model_definition(path.read_text(encoding="utf-8"), path=path)


def load_service_definition(folder: Path) -> ServiceDefinition | None:
    path = folder / SERVICE_DEFINITION_NAME
    if not path.is_file():
        return None
    return parse_service_definition(path.read_text(encoding="utf-8"), path=path)


# A Hugging Face model folder as vLLM and `transformers serve` load it: its config (Mistral's own
# format has params.json instead) and weights, at its top level.
CONFIG_NAMES = ("config.json", "params.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HF_FOLDER_RUNTIMES = ("vllm", "transformers")


def _names_model(runtime: str, extra_args: Sequence[str]) -> bool:
    """Whether extra_args name the model the engine serves instead of the folder. vLLM's argument
    parser takes the last --model; `transformers serve` takes its model as the one positional
    argument, which the folder fills, so nothing in its extra_args replaces it."""
    if runtime != "vllm":
        return False
    args = list(extra_args)
    return any((a == "--model" and i + 1 < len(args)) or (a.startswith("--model=") and len(a) > len("--model=")) for i, a in enumerate(args))


def check_model_files(runtime: str, folder: str, names: Iterable[str], extra_args: Sequence[str]) -> None:
    """Refuse (422) a folder the runtime cannot load: it would crash-loop until ERROR minutes later."""
    if runtime not in HF_FOLDER_RUNTIMES or _names_model(runtime, extra_args):
        return
    names = list(names)
    missing = [what for what, found in (
        ("config.json", any(n in CONFIG_NAMES for n in names)),
        ("weights (*.safetensors, *.bin or *.pt)", any(n.endswith(WEIGHT_SUFFIXES) for n in names)),
    ) if not found]
    if not missing:
        return
    hint = ""
    if any(n.endswith(".gguf") for n in names):
        hint = "; it has a .gguf file: runtime 'llama-cpp' serves those"
    elif runtime == "vllm":
        hint = "; or name the model in extra_args (--model PATH or hub id)"
    raise ApplianceError(
        f"runtime {runtime!r} serves a Hugging Face model folder: config.json and weights (*.safetensors, *.bin or *.pt) at its top level; "
        f"{folder} has no {' and no '.join(missing)}{hint}",
        status=422, code="model_file_required", param="model_folder",
    )
