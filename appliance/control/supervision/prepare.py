"""What a worker is started with, once it has a place (a port, GPUs): its argv with the templates
filled, its environment, its pre-start actions run, its model directory checked. The same for a
replica on this box (runner.py) and one on a Ray Serve node (control/ray/replica.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from appliance.control.host.identity import WorkerIdentity
from appliance.control.host.prestart import run_pre_start_actions
from appliance.control.host.replica_log import ReplicaLog
from appliance.control.models.folders import find_definition_file, load_model_definition
from appliance.domain.definitions import ModelDefinition
from appliance.domain.runtimes import Placement, WorkerSpec, build_worker_spec
from appliance.domain.specs import EndpointConfig
from appliance.domain.templates import render, render_all
from appliance.errors import ApplianceError


async def read_definition(config: EndpointConfig) -> ModelDefinition | None:
    """The model definition a `custom` endpoint starts from (None for the engine runtimes)."""
    if config.runtime != "custom":
        return None
    path = await asyncio.to_thread(find_definition_file, Path(config.model_folder), config.definition_file)
    return await asyncio.to_thread(load_model_definition, path) if path else None


async def prepare_worker(
    config: EndpointConfig, definition: ModelDefinition | None, placement: Placement, *, work_dir: Path, device_env: Mapping[str, str],
    secrets: Mapping[str, str], sink: ReplicaLog, grace: float, identity: WorkerIdentity | None = None,
) -> tuple[WorkerSpec, dict[str, str]]:
    """The worker's spec (argv rendered) and environment. `device_env`: which GPUs it sees; `secrets`: its
    sealed environ, opened; `identity`: the account it runs as, when not the appliance's."""
    spec = build_worker_spec(config, definition, placement)
    if definition is not None and definition.unused:
        sink.note(f"model definition: serving {definition.model.name!r}; entries not started here: {', '.join(definition.unused)}")
    variables = dict(spec.variables)
    stated = {k: render(v, variables, where=f"environ.{k}") for k, v in spec.env.items()}
    env = {**base_env(), **stated, **secrets, **device_env}
    if identity is not None:
        env.update(HOME=str(work_dir), USER=identity.user)
        await asyncio.to_thread(identity.hand_over, work_dir)
    if spec.pre_start_actions:
        await run_pre_start_actions(spec.pre_start_actions, work_dir=work_dir, variables=variables, env=env, sink=sink, grace=grace, identity=identity)
        if identity is not None:  # what the actions wrote belongs to the worker
            await asyncio.to_thread(identity.hand_over, work_dir)
    argv = tuple(render_all(spec.argv, variables, where="start command"))
    if spec.cwd is not None and not await asyncio.to_thread(Path(spec.cwd).is_dir):
        raise ApplianceError(f"the model directory does not exist: {spec.cwd}", status=422, code="model_path_missing")
    return dataclasses.replace(spec, argv=argv), env


def base_env() -> dict[str, str]:
    """What a worker inherits from the appliance: only what programs need to run, not its settings."""
    keep = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env
