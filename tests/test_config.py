from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_config

from appliance.config import load_config, parse_config
from appliance.errors import ApplianceError


def problems(raw: dict, base: Path = Path("/etc/appliance")) -> list[str]:
    with pytest.raises(ApplianceError) as info:
        parse_config(raw, base=base)
    assert info.value.code == "invalid_config"
    return info.value.problems


def test_example_config_loads_and_documents_every_key() -> None:
    config = load_config(REPO / "config.example.toml")
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 16 << 20
    assert config.workers.port_range == (20000, 20999)
    assert config.gpus.devices == "all"
    (ep,) = config.endpoints
    assert ep.name == "llama-8b" and ep.runtime == "vllm" and ep.resources is not None and ep.resources.mem == 32 << 30
    text = (REPO / "config.example.toml").read_text()
    from appliance.config import AuthConfig, AutoscalingConfig, Config, GatewayConfig, GpusConfig, GrpcConfig, ResidencyConfig, RetentionConfig, ServerConfig, WorkersConfig
    from appliance.domain.specs import EndpointSpec, HealthCheck, Resources

    for model in (ServerConfig, WorkersConfig, GpusConfig, GatewayConfig, AuthConfig, AutoscalingConfig, RetentionConfig, ResidencyConfig, GrpcConfig, EndpointSpec, Resources, HealthCheck):
        for key in model.model_fields:
            assert f"{key} =" in text or f"[endpoints.{key}]" in text, f"config.example.toml does not document {model.__name__}.{key}"
    assert set(Config.model_fields) - {"source"} <= {"server", "workers", "gpus", "gateway", "auth", "autoscaling", "retention", "logging", "metrics", "models", "residency", "backend", "grpc", "endpoints"}


def test_defaults_without_a_file_section() -> None:
    config = parse_config({}, base=Path("/x"))
    assert config.server.host == "127.0.0.1"
    assert config.log_dir == Path("/var/lib/appliance/logs")
    assert config.admin_key_path == Path("/var/lib/appliance/admin.key")


def test_unknown_keys_are_named_with_their_path() -> None:
    assert problems({"server": {"prot": 1}}) == ["server.prot: unknown key"]
    assert problems({"nonsense": {}}) == ["nonsense: unknown key"]
    assert problems({"endpoints": [{"name": "a", "model_folder": "/m", "replica": 2}]}) == ["endpoints[0].replica: unknown key"]


def test_wrong_types_are_named_with_their_path() -> None:
    assert problems({"server": {"port": "8080"}}) == ["server.port: must be an integer (got a string)"]
    assert problems({"endpoints": [{"name": "a", "model_folder": "/m", "public": "yes"}]}) == [
        "endpoints[0].public: must be true or false (got a string)"
    ]
    assert problems({"endpoints": {"name": "a"}}) == ["endpoints: must be a list (got a table)"]


def test_bounds_and_every_problem_reported_at_once() -> None:
    found = problems(
        {
            "server": {"port": 70000, "max_body_bytes": 10},
            "workers": {"port_range": [3000, 2000], "stop_grace_seconds": -1},
            "endpoints": [
                {"name": "ok", "model_folder": "/m"},
                {"name": "bad", "model_folder": "/m", "replicas": -1},
            ],
        }
    )
    assert "server.port: must be ≤ 65535" in found
    assert "server.max_body_bytes: must be ≥ 1024" in found
    assert "workers.port_range: must be [first, last] with 1024 ≤ first ≤ last ≤ 65535 (got [3000, 2000])" in found
    assert "workers.stop_grace_seconds: must be ≥ 0" in found
    assert "endpoints[1].replicas: must be ≥ 0" in found
    assert len(found) == 5


def test_replica_bounds_are_checked_in_order() -> None:
    ep = {"name": "a", "model_folder": "/m"}
    assert problems({"endpoints": [{**ep, "replicas": 2, "min_replicas": 3}]}) == ["endpoints[0].min_replicas: must be ≤ replicas (2)"]
    assert problems({"endpoints": [{**ep, "replicas": 2, "max_replicas": 1}]}) == ["endpoints[0].max_replicas: must be ≥ replicas (2)"]
    assert problems({"endpoints": [{**ep, "resources": {"gpus": 1, "gpu_share": 0.5}}]}) == [
        "endpoints[0].resources: give either gpus (whole GPUs) or gpu_share (a fraction of one GPU), not both"
    ]
    assert problems({"endpoints": [{**ep, "resources": {"gpu_share": 1.5}}]}) == ["endpoints[0].resources.gpu_share: must be < 1"]


def test_invalid_names_and_duplicates() -> None:
    for bad in ("", "a b", "x" * 51, "naïve", "a/b"):
        (msg,) = problems({"endpoints": [{"name": bad, "model_folder": "/m"}]})
        assert msg.startswith("endpoints[0].name: must be 1–50 characters")
    found = problems({"endpoints": [{"name": "a", "model_folder": "/m"}, {"name": "b", "model_folder": "/m", "aliases": ["a"]}]})
    assert found == ["endpoints[1]: name or alias 'a' is already used by endpoints[0]"]


def test_sizes_and_relative_paths(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        '[server]\nstate_dir = "state"\nmax_body_bytes = "1mb"\n[[endpoints]]\nname = "a"\nmodel_folder = "models/a"\n'
        '[endpoints.resources]\nmem = "1.5gb"\n[endpoints.environ]\nPORT = 8000\nDEBUG = true\n',
    )
    config = load_config(path)
    assert config.server.state_dir == tmp_path / "state"
    assert config.server.max_body_bytes == 1 << 20
    assert config.endpoints[0].model_folder == str(tmp_path / "models" / "a")
    assert config.endpoints[0].resources is not None and config.endpoints[0].resources.mem == int(1.5 * (1 << 30))
    assert config.endpoints[0].environ == {"PORT": "8000", "DEBUG": "true"}


def test_config_is_immutable(tmp_path: Path) -> None:
    config = parse_config({}, base=tmp_path)
    with pytest.raises(Exception):
        config.server.port = 1  # type: ignore[misc]


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", "[server\nport = 1\n")
    with pytest.raises(ApplianceError, match=r"not valid TOML: .*line 1"):
        load_config(path)
    with pytest.raises(ApplianceError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.process
def test_check_config_prints_every_problem(tmp_path: Path) -> None:
    bad = write_config(
        tmp_path / "bad.toml",
        '[server]\nport = "x"\nfoo = 1\n[[endpoints]]\nname = "a b"\nmodel_folder = "/m"\nreplicas = -1\n',
    )
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{bad}: server.port: must be an integer (got a string)",
        f"{bad}: server.foo: unknown key",
        f"{bad}: endpoints[0].name: must be 1–50 characters of A–Z, a–z, 0–9, '_' or '-' (got 'a b')",
        f"{bad}: endpoints[0].replicas: must be ≥ 0",
    ]


@pytest.mark.process
def test_check_config_checks_declared_folders(tmp_path: Path, seed_folder: Path) -> None:
    ok = write_config(tmp_path / "ok.toml", f'[[endpoints]]\nname = "seed"\nmodel_folder = "{seed_folder}"\n')
    result = run_cli("check-config", str(ok))
    assert result.returncode == 0, result.stderr
    assert "OK (1 endpoint(s) declared" in result.stdout
    missing = write_config(tmp_path / "missing.toml", '[[endpoints]]\nname = "gone"\nmodel_folder = "/does/not/exist"\n')
    result = run_cli("check-config", str(missing))
    assert result.returncode == 1
    assert "endpoints[0] (gone): model_folder: /does/not/exist does not exist" in result.stderr


def test_the_demo_config_for_each_engine(tmp_path: Path) -> None:
    from appliance.config import load_config
    from appliance.demo_model import DEMO_VERSION, is_current_demo_model, write_demo_config

    for engine in ("transformers", "vllm"):
        config = load_config(write_demo_config(tmp_path / engine, tmp_path / "model", port=8123, engine=engine))
        (ep,) = config.endpoints
        assert ep.runtime == engine and config.server.port == 8123
        assert ep.environ == ({"VLLM_CPU_KVCACHE_SPACE": "1"} if engine == "vllm" else {})
    folder = tmp_path / "old"
    folder.mkdir()
    assert not is_current_demo_model(folder)
    (folder / "config.json").write_text('{"hidden_size": 64, "num_attention_heads": 4}')  # head_dim 16: written by an older version
    assert not is_current_demo_model(folder)
    (folder / "config.json").write_text('{"hidden_size": 64, "num_attention_heads": 1}')
    assert not is_current_demo_model(folder)  # no marker: an older version's, which answered only whitespace
    (folder / "appliance-demo.json").write_text(json.dumps({"version": DEMO_VERSION - 1}))
    assert not is_current_demo_model(folder)
    (folder / "appliance-demo.json").write_text(json.dumps({"version": DEMO_VERSION}))
    assert is_current_demo_model(folder)


def test_every_unmarked_value_in_the_example_is_the_default() -> None:
    import tomllib

    text = (REPO / "config.example.toml").read_text()
    lines = text.splitlines()
    example = tomllib.loads(text)
    defaults = parse_config({}, base=REPO)
    unmarked = []
    for section, table in example.items():
        if section == "endpoints":
            continue  # one declared endpoint, an example as a whole
        for key, value in table.items():
            if isinstance(value, (dict, list)) and key in ("credentials", "declared"):
                continue  # entries of the user's own: examples as a whole
            shown = getattr(parse_config({section: {key: value}}, base=REPO), section)
            if getattr(shown, key) == getattr(getattr(defaults, section), key):
                continue
            header = lines.index(f"[{section}]")
            at = next(i for i, line in enumerate(lines) if i > header and line.startswith(f"{key} ="))
            if not any("example" in line for line in lines[max(0, at - 3) : at + 1]):
                unmarked.append(f"[{section}] {key} = {value!r}")
    assert not unmarked, f"values in config.example.toml that are not the defaults and not marked (example): {unmarked}"
