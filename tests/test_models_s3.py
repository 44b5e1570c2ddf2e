"""S3 sources against a real S3-compatible HTTP server on loopback: moto's standalone server, started here
as a process on a port it picks, with IAM authentication on (so wrong credentials are refused as AWS
refuses them). Warms with credentials from the config (sealed or plain) or the standard AWS environment,
ranged reads for a resumed warm, and the 4xx answers that leave nothing behind."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import Admin, async_wait_for, wait_for
from test_models import Gate, MiB, model_events, same_tree, wait_model, write_model
from test_supervisor import WORKERS

from appliance.control.models import sources as model_sources
from appliance.control.models.sources import S3Source
from appliance.control.models.registry import Registry
from appliance.domain.models import ModelSpec
from appliance.security.vault import Vault
from appliance.store import Store

pytestmark = pytest.mark.process

BUCKET = "models"
FILES = {"config.json": 700, "service-definition.toml": 0, "weights/model-00001.safetensors": 6 * MiB + 3, "weights/model-00002.safetensors": 2 * MiB}
SERVICE_DEFINITION = b'[environ]\nMODEL_NAME = "from-s3"\n'
AUTH_SETUP_ACTIONS = 3  # create_user, create_access_key, put_user_policy: what moto lets through before it checks signatures


class MotoServer:
    def __init__(self, tmp: Path) -> None:
        self.log = tmp / "moto.log"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(AUTH_SETUP_ACTIONS), "AWS_DEFAULT_REGION": "us-east-1"}
        with open(self.log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=subprocess.STDOUT, env=env)

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"moto server exited: {self.log.read_text()}")
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
            return int(found.group(1)) if found else None

        self.url = f"http://127.0.0.1:{wait_for(port, timeout=30, what='moto server to listen')}"

    def client(self, service: str, key: str = "setup", secret: str = "setup") -> Any:
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server, an IAM user whose key may do anything on S3, and a bucket holding one model under llama/."""
    tmp = tmp_path_factory.mktemp("moto")
    server = MotoServer(tmp)
    try:
        iam = server.client("iam")
        iam.create_user(UserName="loader")
        key = iam.create_access_key(UserName="loader")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="loader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        good = (key["AccessKeyId"], key["SecretAccessKey"])
        s3c = server.client("s3", *good)
        s3c.create_bucket(Bucket=BUCKET)
        source = write_model(tmp / "llama", FILES)
        (source / "service-definition.toml").write_bytes(SERVICE_DEFINITION)
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            s3c.upload_file(str(path), BUCKET, "llama/" + path.relative_to(source).as_posix())
        s3c.put_object(Bucket=BUCKET, Key="llama/empty-folder/", Body=b"")  # a folder marker some tools write
        yield {"url": server.url, "key": good, "local": source}
    finally:
        server.stop()


def s3_config(make_config: Any, s3: dict[str, Any], tmp_path: Path, **models: Any) -> Any:
    key_id, secret = s3["key"]
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    sealed = Vault(state / "secret.key").seal(secret)  # as `appliance model seal-secret` writes it
    credentials = {
        "good": {"access_key_id": key_id, "secret_access_key": secret},
        "sealed": {"access_key_id": key_id, "secret_access_key": sealed},
        "wrong": {"access_key_id": "AKIAIOSFODNN7WRONG00", "secret_access_key": "not-the-secret"},
    }
    return make_config({"workers": WORKERS, "models": {"credentials": credentials, "parallel": 4, **models}})


def body(s3: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": f"s3://{BUCKET}/llama", "endpoint_url": s3["url"], **extra}


async def test_s3_warm_with_sealed_credentials(start_inprocess_app: Any, make_config: Any, s3: dict[str, Any], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    admin: Admin = await start_inprocess_app(s3_config(make_config, s3, tmp_path))
    status, created = await admin.call("POST", "/api/v1/models", json_body=body(s3, "llama", credentials="sealed", region="us-east-1"))
    assert status == 201, created
    assert created["files"] == len(FILES) and created["source"] == f"s3://{BUCKET}/llama/" and created["credentials"] == "sealed"
    ready = await wait_model(admin, "llama", "READY", timeout=60)
    local = Path(ready["local_path"])
    # The definition file read at registration is not fetched again: the warm checks the copy it kept.
    assert same_tree(s3["local"], local) and ready["progress"]["bytes_fetched"] == ready["size"] - len(SERVICE_DEFINITION)
    assert all(f["sha256"] for f in ready["manifest"])
    # An endpoint on it resolves from the service definition fetched at registration.
    spec = {"name": "s3ep", "model": "llama", "runtime": "cmd", "command": [sys.executable, "-c", "pass"], "replicas": 0}
    status, ep = await admin.call("POST", "/api/v1/endpoints", json_body=spec)
    assert status == 201 and ep["environ"] == {"MODEL_NAME": "from-s3"} and ep["model_folder"] == str(local)
    secret = s3["key"][1]
    everything = json.dumps([ready, await model_events(admin), (await admin.call("GET", "/api/v1/models"))[1], (await admin.call("GET", "/api/v1/events"))[1]])
    assert secret not in everything and secret not in caplog.text
    assert "fernet:" not in everything


async def test_s3_standard_aws_environment(start_inprocess_app: Any, make_config: Any, s3: dict[str, Any], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["key"][1])
    admin: Admin = await start_inprocess_app(s3_config(make_config, s3, tmp_path))
    assert (await admin.call("POST", "/api/v1/models", json_body=body(s3, "from-env")))[0] == 201
    await wait_model(admin, "from-env", "READY", timeout=60)


async def test_s3_bad_input_is_a_clear_4xx_with_nothing_created(start_inprocess_app: Any, make_config: Any, s3: dict[str, Any], tmp_path: Path) -> None:
    admin: Admin = await start_inprocess_app(s3_config(make_config, s3, tmp_path))
    cases = [
        ({**body(s3, "nobucket", credentials="good"), "source": "s3://no-such-bucket/llama"}, 422, "bucket_not_found"),
        (body(s3, "wrongkey", credentials="wrong"), 422, "s3_access_denied"),
        (body(s3, "nocreds", credentials="absent"), 422, "unknown_credentials"),
        ({**body(s3, "noprefix", credentials="good"), "source": f"s3://{BUCKET}/nothing-here"}, 422, "source_empty"),
    ]
    for request, status, code in cases:
        got, answer = await admin.call("POST", "/api/v1/models", json_body=request)
        assert (got, answer["error"]["code"]) == (status, code), answer
        assert "not-the-secret" not in answer["error"]["message"]
    assert "no-such-bucket" in (await admin.call("POST", "/api/v1/models", json_body=cases[0][0]))[1]["error"]["message"]
    assert (await admin.call("GET", "/api/v1/models"))[1]["data"] == []
    models_dir = admin.config.server.state_dir / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())
    assert [e for e in await model_events(admin)] == []


async def test_s3_interrupted_warm_resumes_with_ranged_reads(make_config: Any, s3: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_sources, "CHUNK", MiB)
    config = s3_config(make_config, s3, tmp_path, parallel=2)
    big = "weights/model-00001.safetensors"
    gate = Gate(monkeypatch, big, cls=S3Source)
    store = Store(config.db_path, time.time)
    await store.open()
    first = Registry(config, store, time.time, Vault(config.secret_key_path))
    await first.register(ModelSpec(name="resumed", source=f"s3://{BUCKET}/llama", endpoint_url=s3["url"], credentials="good", revision="r1"))
    await asyncio.to_thread(gate.reached.wait, 30)
    stopping = asyncio.create_task(first.stop())
    # the stop has reached every warm before the held read goes on: it ends at its next chunk
    await async_wait_for(lambda: all(w.cancel.is_set() for w in first._warms.values()), timeout=10, what="the stop to reach the warms")
    gate.release.set()
    await stopping
    partial = config.server.state_dir / "models" / "resumed" / ".partial-r1" / big
    kept = partial.stat().st_size
    assert kept == 2 * MiB and gate.fetched(big) == kept
    sizes = {p.relative_to(s3["local"]).as_posix(): p.stat().st_size for p in s3["local"].rglob("*") if p.is_file()}
    before = {path: gate.fetched(path) for path in sizes}
    gate.reads.clear()
    second = Registry(config, store, time.time, Vault(config.secret_key_path))
    await second.start()

    async def ready() -> bool:
        row = await store.models.get("resumed")
        assert row is not None and row["state"] != "FAILED", row["last_error"]
        return row["state"] == "READY"

    await async_wait_for(ready, timeout=60, what="the resumed warm")
    assert [(p, off) for p, off, _ in gate.reads if p == big] == [(big, kept)]  # a ranged GET from where the part ended
    for path, size in sizes.items():
        assert before[path] + gate.fetched(path) == size, path  # no byte of the source read twice (definition files included)
    row = await store.models.get("resumed")
    assert row is not None and same_tree(s3["local"], Path(row["local_path"]))
    await second.stop()
    await store.close()


async def test_an_object_rewritten_during_the_warm_fails_it_instead_of_mixing_versions(
    make_config: Any, s3: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = boto3.client("s3", endpoint_url=s3["url"], region_name="us-east-1", aws_access_key_id=s3["key"][0], aws_secret_access_key=s3["key"][1])
    for rel, data in {"config.json": b"{}", "a.bin": os.urandom(3 * MiB), "b.bin": os.urandom(MiB)}.items():
        client.put_object(Bucket=BUCKET, Key=f"rewritten/{rel}", Body=data)
    monkeypatch.setattr(model_sources, "CHUNK", 256 << 10)
    config = s3_config(make_config, s3, tmp_path, parallel=1)  # one file at a time, the largest first
    gate = Gate(monkeypatch, "a.bin", cls=S3Source)
    store = Store(config.db_path, time.time)
    await store.open()
    registry = Registry(config, store, time.time, Vault(config.secret_key_path))
    await registry.register(ModelSpec(name="moving", source=f"s3://{BUCKET}/rewritten", endpoint_url=s3["url"], credentials="good"))
    await asyncio.to_thread(gate.reached.wait, 30)
    client.put_object(Bucket=BUCKET, Key="rewritten/b.bin", Body=os.urandom(MiB))  # the same size, other bytes, after the listing
    gate.release.set()

    async def failed() -> dict[str, Any] | None:
        row = await store.models.get("moving")
        assert row is not None and row["state"] != "READY", "a file rewritten after the listing was copied as if nothing happened"
        return row if row["state"] == "FAILED" else None

    row = await async_wait_for(failed, timeout=60, what="the warm to fail")
    assert "rewritten while the model was copied" in row["last_error"], row["last_error"]
    await registry.stop()
    await store.close()

