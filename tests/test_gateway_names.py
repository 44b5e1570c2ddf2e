"""An unknown model's 404 names the closest endpoints the caller may use, and only those."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Admin
from test_access import bearer, new_key
from test_gateway import healthy
from test_supervisor import WORKERS, create, fake_folder

pytestmark = pytest.mark.usefixtures("slow_callback_guard")


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS}))


async def not_found(admin: Admin, model: str, headers: dict[str, str]) -> tuple[int, str, str]:
    resp = await admin.client.post("/v1/chat/completions", json={"model": model, "messages": []}, headers=headers)
    err = (await resp.json())["error"]
    return resp.status, err["code"], err["message"]


async def test_an_unknown_model_is_answered_with_the_closest_names_the_caller_may_use(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "demo", fake_folder(tmp_path, "demo"), aliases=["demo-latest"])
    await create(admin, "demos-secret", fake_folder(tmp_path, "demos-secret"), replicas=0, min_replicas=0)
    await create(admin, "open-demo", fake_folder(tmp_path, "open-demo"), replicas=0, min_replicas=0, public=True)
    status, code, message = await not_found(admin, "dmeo", admin.headers)
    assert (status, code) == (404, "model_not_found") and message.endswith("did you mean 'demo'?"), message
    status, _, message = await not_found(admin, "demo-secrets", admin.headers)  # an admin key may use every endpoint
    assert status == 404 and message.endswith("did you mean 'demos-secret' or 'demo-latest'?"), message
    only_demo = await new_key(admin, endpoints=["demo"])  # it may not use demos-secret: never named to it
    status, _, message = await not_found(admin, "demo-secrets", bearer(only_demo["key"]))
    assert status == 404 and message.endswith("did you mean 'demo-latest'?"), message
    status, _, message = await not_found(admin, "open-dem", bearer(only_demo["key"]))  # public ones it may use too
    assert status == 404 and message.endswith("did you mean 'open-demo'?"), message
    status, _, message = await not_found(admin, "zzz", bearer(only_demo["key"]))
    assert status == 404 and "did you mean" not in message
    resp = await admin.client.get("/endpoints/dem/v1/models", headers=bearer(only_demo["key"]))
    err = (await resp.json())["error"]
    assert resp.status == 404 and err["code"] == "endpoint_not_found" and "did you mean 'demo'?" in err["message"], err
    # no credential: the same 401 as before, whatever the name, and nothing listed
    status, code, message = await not_found(admin, "dmeo", {})
    assert status == 401 and "demo" not in message
