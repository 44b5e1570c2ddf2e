"""The console's Loaded page (`appliance ps` in the browser) against a real `appliance serve` on a box without
GPUs: an on-demand endpoint loaded by a request shows with its host memory claim against
[residency] host_memory_budget, Unload drains it away, and an unload the API refuses shows the API's message."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess
from test_console import WAIT_MS, Page, _http, admin_key, browser, expect, log_in, open_page, snap  # noqa: F401 (fixtures)
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process

RESIDENCY = '[gpus]\ndevices = "none"\n[residency]\nhost_memory_budget = "1gb"\nmin_resident_seconds = 0\n'


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    return server_factory(server_config(tmp_path, RESIDENCY)).start()


def test_the_loaded_page_lists_an_endpoint_loaded_on_demand_and_unloads_it(
    server: ServerProcess, open_page: Callable[[], Page], snap: Any, tmp_path: Path,  # noqa: F811 (fixtures)
) -> None:
    auth = {"Authorization": f"Bearer {admin_key(server)}"}
    for body in (
        {"name": "lazy", "model_folder": str(fake_folder(tmp_path, "lazy")), "resources": {"mem": "100mb"}, "on_demand": True},
        {"name": "steady", "model_folder": str(fake_folder(tmp_path, "steady")), "replicas": 1},
    ):
        status, created, _ = _http(server, "POST", "/api/v1/endpoints", body, auth)
        assert status == 201, created
    chat = {"model": "lazy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer, _ = _http(server, "POST", "/v1/chat/completions", chat, auth)  # waits while lazy loads
    assert status == 200, answer

    page = open_page()
    log_in(page, server, admin_key(server))
    page.get_by_role("link", name="Loaded").click()
    expect(page.get_by_role("heading", name="Loaded", exact=True)).to_be_visible()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="lazy", exact=True))
    expect(row).to_contain_text("HEALTHY")
    expect(row).to_contain_text("100 MiB")  # its host claim, resources.mem
    expect(row).to_contain_text(re.compile(r"\d+ (s|min)"))  # idle, and until keep_alive (5m) unloads it
    expect(row.get_by_role("link", name="lazy")).to_have_attribute("href", "#/endpoints/lazy")
    steady = page.get_by_role("row").filter(has=page.get_by_role("link", name="steady", exact=True))
    expect(steady).to_contain_text("never", timeout=WAIT_MS)  # not on demand: no keep_alive unload
    expect(page.get_by_role("meter", name="Host memory: 100 MiB of 1.0 GiB claimed")).to_be_visible()
    snap(page, "loaded")

    steady.get_by_role("button", name="Unload steady").click()  # 409 not_on_demand: the API's own words
    expect(page.get_by_role("alert").filter(has_text="Unloading steady failed")).to_contain_text("on demand")
    expect(steady).to_be_visible()

    row.get_by_role("button", name="Unload lazy").click()
    expect(page.get_by_role("alert").filter(has_text="Unloading lazy")).to_be_visible()
    expect(row).to_have_count(0, timeout=WAIT_MS)  # drained and stopped: the next poll leaves it out
    expect(page.get_by_role("meter", name="Host memory: 0 B of 1.0 GiB claimed")).to_be_visible()
    snap(page, "unloaded")


def test_a_pinned_endpoint_has_no_unload_button(server: ServerProcess, open_page: Callable[[], Page], tmp_path: Path) -> None:  # noqa: F811
    body = {"name": "kept", "model_folder": str(fake_folder(tmp_path, "kept")), "resources": {"mem": "200mb"}, "on_demand": True, "pin": True}
    status, created, _ = _http(server, "POST", "/api/v1/endpoints", body, {"Authorization": f"Bearer {admin_key(server)}"})
    assert status == 201, created
    page = open_page()
    log_in(page, server, admin_key(server))
    page.goto(server.url + "/ui/#/loaded")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="kept", exact=True))
    expect(row).to_contain_text("pinned", timeout=WAIT_MS)  # pinned: loaded at once, never unloaded
    expect(row.get_by_role("button")).to_have_count(0)
    expect(page.get_by_role("meter", name="Host memory: 200 MiB of 1.0 GiB claimed")).to_be_visible()
