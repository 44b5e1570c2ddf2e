"""The web console at /ui in a real browser (Debian's Chromium, headless, driven by Playwright) against a
real `appliance serve`: log in, create an endpoint and watch it turn HEALTHY, follow its log, chat with
it token by token, make and revoke keys, validate a broken folder, the GPU page without NVML, usage, a
read-only session ended by revoking its key, and CSRF over plain HTTP.

Every page is saved as a PNG under the test's tmp_path (and under $APPLIANCE_ARTIFACTS/console when
that is set), to be looked at."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, _nvml_gpu_count
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright for Python (pip install playwright)")
expect = sync_api.expect
Page = sync_api.Page

WAIT_MS = 30_000  # for anything a replica must do first (start, turn healthy)
VIEWPORT = {"width": 1366, "height": 800}  # a laptop screen


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    return server_factory(server_config(tmp_path, "")).start()


def admin_key(server: ServerProcess) -> str:
    return (server.state_dir / "admin.key").read_text().strip()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[], Page]]:
    """New pages, each in a context of its own (its own cookies); a script error, or anything the content
    security policy refused, on any of them fails the test."""
    contexts: list[Any] = []
    errors: list[str] = []

    def make() -> Page:
        context = browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "Content Security Policy" in msg.text else None)
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"script errors in the console: {errors}"


@pytest.fixture
def snap(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    """Save a screenshot of the whole page: tmp_path/screenshots, and a copy under $APPLIANCE_ARTIFACTS/console."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    extra = os.environ.get("APPLIANCE_ARTIFACTS")

    def take(page: Page, name: str) -> Path:
        path = folder / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if extra:
            target = Path(extra) / "console"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)
        return path

    return take


def log_in(page: Page, server: ServerProcess, key: str) -> None:
    page.goto(server.url + "/ui/")
    page.get_by_label("API key").fill(key)
    page.keyboard.press("Enter")  # the login is a real form
    expect(page.get_by_role("heading", name="Endpoints", exact=True)).to_be_visible()


def test_log_in_create_an_endpoint_follow_its_log_and_chat(server: ServerProcess, open_page: Callable[[], Page], snap: Any, tmp_path: Path) -> None:
    page = open_page()
    page.goto(server.url + "/ui/")
    expect(page.get_by_role("heading", name="appliance console")).to_be_visible()
    page.get_by_label("API key").fill("ak-not-the-key")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert").filter(has_text="invalid API key")).to_be_visible()  # the server's message
    snap(page, "login-refused")
    log_in(page, server, admin_key(server))
    expect(page.get_by_text("No endpoints yet")).to_be_visible()

    page.get_by_role("link", name="Create endpoint").first.click()
    page.get_by_label("Name", exact=True).fill("chat")
    page.get_by_label("Model folder").fill(str(fake_folder(tmp_path, "chat", "--tokens-per-second", "40")))
    page.get_by_label("Description").fill("fake worker for the console test")
    snap(page, "create")
    page.get_by_role("button", name="Create endpoint").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("HEALTHY", timeout=WAIT_MS)
    replicas = page.get_by_role("region", name="Endpoint facts")
    expect(replicas).to_contain_text("1 healthy")
    expect(page.locator("table").first).to_contain_text("GET /health: HTTP 200")

    log = page.get_by_label("Replica log")
    expect(log).to_contain_text("starting:")
    page.get_by_role("button", name="Follow").click()
    expect(page.get_by_role("button", name="Following (stop)")).to_have_attribute("aria-pressed", "true")
    expect(log).to_contain_text("health 200")
    lines = len(log.inner_text().splitlines())
    page.wait_for_function("n => document.querySelector('pre.log').textContent.split('\\n').length > n", arg=lines)  # probes keep coming
    snap(page, "endpoint")
    page.get_by_role("button", name="Following (stop)").click()

    page.get_by_role("link", name="Endpoints", exact=True).click()
    # The list's own rows: until the page has changed, the endpoint page's event rows also name "chat".
    row = page.get_by_role("region", name="Endpoint list").get_by_role("row").filter(has_text="chat")
    expect(row).to_contain_text("HEALTHY")
    expect(row).to_contain_text("private")
    expect(row).to_contain_text(f"{server.url}/endpoints/chat/")
    snap(page, "endpoints")

    page.goto(server.url + "/ui/#/chat/chat")
    expect(page.get_by_label("Endpoint", exact=True)).to_have_value("chat")
    page.get_by_label("Max tokens").fill("24")
    # Every length the answer shows on its way: a streamed answer grows in many steps, not in one.
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const text = document.querySelector('.transcript li.assistant .text');
            if (text) window.answerLengths.push(text.textContent.length);
        }).observe(document.querySelector('.transcript'), { subtree: true, childList: true, characterData: true });
    }""")
    page.get_by_label("Message", exact=True).fill("Hello, appliance")
    page.keyboard.press("Enter")
    answer = page.locator(".transcript li.assistant")
    expect(answer).to_contain_text("tok0 tok1 tok2")
    expect(answer).to_contain_text("tok23")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert len(set(page.evaluate("window.answerLengths"))) >= 12, "the answer did not arrive token by token"
    stats = page.get_by_role("status").filter(has_text="Time to first token")
    expect(stats).to_contain_text(re.compile(r"Time to first token\s*\d+ ms"))
    expect(stats).to_contain_text(re.compile(r"Tokens/s\s*\d+\.\d"))
    expect(stats).to_contain_text(re.compile(r"Tokens\s*24(?!\d)"))  # the usage the worker reported
    snap(page, "chat")

    page.get_by_role("link", name="Usage").click()
    expect(page.locator(".totals")).to_contain_text(re.compile(r"^\s*[1-9]\d*\s*requests"))
    expect(page.locator(".chart svg rect").first).to_be_visible()
    expect(page.get_by_role("region").filter(has_text="Per endpoint")).to_contain_text("chat")
    snap(page, "usage")


def test_the_chat_calls_a_custom_server_straight_with_its_own_token(server: ServerProcess, open_page: Callable[[], Page], snap: Any) -> None:
    """The browser calls the custom URL itself (no appliance in between, no console cookie): the server here
    is played by the page's own network layer, which records what arrived and answers as a CORS-enabled server."""
    seen: list[dict[str, Any]] = []
    cors = {"Access-Control-Allow-Origin": server.url, "Access-Control-Allow-Headers": "authorization, content-type", "Access-Control-Allow-Methods": "POST"}
    chunks = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in ("Hello ", "from ", "elsewhere")]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def answer(route: Any) -> None:
        request = route.request
        if request.method == "OPTIONS":
            route.fulfill(status=204, headers=cors)
            return
        seen.append({"url": request.url, "headers": request.headers, "body": json.loads(request.post_data or "{}")})
        route.fulfill(status=200, headers={**cors, "Content-Type": "text/event-stream"}, body=stream)

    page = open_page()
    page.route("http://llm.example.test/**", answer)
    log_in(page, server, admin_key(server))
    page.get_by_role("link", name="Chat test").click()
    page.get_by_label("Use a custom OpenAI-compatible server").check()
    page.get_by_label("Base URL").fill("http://llm.example.test/v1/")
    page.get_by_label("Token", exact=True).fill("sk-elsewhere")
    page.get_by_label("Model", exact=True).fill("their-model")
    page.get_by_label("Message", exact=True).fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".transcript li.assistant")).to_contain_text("Hello from elsewhere")
    expect(page.get_by_role("status").filter(has_text="Time to first token")).to_contain_text(re.compile(r"\d+ ms"))
    (call,) = seen
    assert call["url"] == "http://llm.example.test/v1/chat/completions"
    assert call["headers"]["authorization"] == "Bearer sk-elsewhere" and "cookie" not in call["headers"] and "x-csrf-token" not in call["headers"]
    assert call["body"]["model"] == "their-model" and call["body"]["stream"] is True and call["body"]["messages"][-1] == {"role": "user", "content": "Hi"}
    snap(page, "chat-custom")


def test_modify_retry_and_delete_an_endpoint(server: ServerProcess, open_page: Callable[[], Page], snap: Any, tmp_path: Path) -> None:
    status, _, _ = _http(server, "POST", "/api/v1/endpoints", {"name": "spare", "model_folder": str(fake_folder(tmp_path, "spare")), "replicas": 0},
                         {"Authorization": f"Bearer {admin_key(server)}"})
    assert status == 201
    page = open_page()
    log_in(page, server, admin_key(server))
    page.get_by_role("link", name="spare").click()
    facts = page.get_by_role("region", name="Endpoint facts")
    expect(facts).to_contain_text("private")
    page.get_by_role("button", name="Modify").click()
    form = page.get_by_role("region", name="Modify endpoint")
    form.get_by_label("Public: open without a key").check()
    form.get_by_label("Description").fill("open to everyone")
    form.get_by_label("Environment").fill("GREETING=hello")
    snap(page, "modify")
    form.get_by_role("button", name="Save changes").click()
    expect(page.get_by_role("alert").filter(has_text="Endpoint spare updated.")).to_be_visible()
    expect(facts).to_contain_text("public: no key needed")
    expect(facts).to_contain_text("GREETING=hello")
    page.get_by_role("button", name="Modify").click()
    form.get_by_label("Replicas", exact=True).fill("3")
    form.get_by_label("Max replicas").fill("1")
    form.get_by_role("button", name="Save changes").click()
    expect(page.get_by_role("alert").filter(has_text="Saving failed")).to_contain_text("max_replicas")  # the API's own message
    form.get_by_role("button", name="Cancel").click()
    page.get_by_role("button", name="Retry").click()
    expect(page.get_by_role("alert").filter(has_text="Retrying spare")).to_be_visible()

    page.get_by_role("button", name="Delete").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Delete endpoint spare?")
    snap(page, "delete-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(facts).to_contain_text("open to everyone")  # still there
    page.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("No endpoints yet")).to_be_visible()
    expect(page.get_by_role("alert").filter(has_text="Endpoint spare deleted.")).to_be_visible()


def test_keys_are_shown_once_and_a_revoked_key_ends_its_session(server: ServerProcess, open_page: Callable[[], Page], snap: Any) -> None:
    page = open_page()
    log_in(page, server, admin_key(server))
    page.get_by_role("link", name="Keys").click()
    page.get_by_label("Name", exact=True).fill("viewer")
    page.get_by_label("inference").uncheck()
    page.get_by_label("read", exact=True).check()
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key")
    expect(secret).to_contain_text("ak-")
    expect(page.get_by_text("shown only this once")).to_be_visible()
    key = secret.inner_text().strip()
    row = page.get_by_role("row").filter(has_text="viewer")
    expect(row).to_contain_text(key[:9])
    snap(page, "key-created")
    page.get_by_role("button", name="Done, hide it").click()
    expect(secret).to_have_count(0)
    page.reload()
    expect(page.get_by_role("row").filter(has_text="viewer")).to_be_visible()
    assert key not in page.content()  # never shown again

    reader = open_page()  # a second browser, logged in with the read key
    log_in(reader, server, key)
    expect(reader.get_by_text("viewer · read-only")).to_be_visible()
    expect(reader.get_by_role("button", name="Create endpoint")).to_be_disabled()
    reader.get_by_role("link", name="Create endpoint").click()
    expect(reader.get_by_role("button", name="Validate")).to_be_disabled()
    reader.get_by_role("link", name="Keys").click()
    expect(reader.get_by_text("this session is read-only")).to_be_visible()
    reader.get_by_role("link", name="Endpoints", exact=True).click()
    snap(reader, "read-only")

    page.get_by_role("row").filter(has_text="viewer").get_by_role("button", name="Revoke viewer").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Revoke key viewer?")
    dialog.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("alert").filter(has_text="Key viewer revoked.")).to_be_visible()
    expect(page.get_by_role("row").filter(has_text="viewer")).to_have_count(0)
    page.get_by_label("Show revoked and expired").check()
    expect(page.get_by_role("row").filter(has_text="viewer")).to_contain_text("revoked")
    snap(page, "key-revoked")

    # The read-only page polls its endpoint list: its next call is refused, and it is back at the login.
    expect(reader.get_by_role("alert").filter(has_text="was revoked")).to_be_visible()
    expect(reader.get_by_label("API key")).to_be_visible()
    snap(reader, "session-ended")


def test_validating_a_broken_folder_shows_why(server: ServerProcess, open_page: Callable[[], Page], snap: Any, tmp_path: Path) -> None:
    page = open_page()
    log_in(page, server, admin_key(server))
    page.get_by_role("link", name="Create endpoint").first.click()
    page.get_by_label("Name", exact=True).fill("broken")
    page.get_by_label("Model folder").fill(str(fake_folder(tmp_path, "broken", "--refuse-to-start")))
    page.get_by_role("button", name="Validate").click()
    verdict = page.locator(".verdict")
    expect(verdict).to_contain_text("Invalid", timeout=WAIT_MS)
    expect(verdict).to_contain_text("exited")
    expect(verdict).to_contain_text("refusing to start")  # the worker's last lines
    states = page.get_by_role("list", name="States")
    expect(states).to_contain_text("STARTING")
    expect(states).to_contain_text("FAILED")
    expect(page.get_by_label("Log of the trial replica")).to_contain_text("refusing to start")
    snap(page, "validate")

    page.get_by_label("Model folder").fill(str(tmp_path / "no-such-folder"))
    page.get_by_role("button", name="Validate").click()
    expect(verdict).to_contain_text("Validation failed")  # a spec that does not resolve: the API's 4xx, shown
    expect(verdict).to_contain_text("no-such-folder")
    page.get_by_role("link", name="Endpoints", exact=True).click()
    expect(page.get_by_text("No endpoints yet")).to_be_visible()  # a dry run creates nothing


def test_the_gpu_page_says_what_nvml_shows(server: ServerProcess, open_page: Callable[[], Page], snap: Any) -> None:
    page = open_page()
    log_in(page, server, admin_key(server))
    # By keyboard alone: from the skip link, the page links in order; the focused one is outlined.
    page.get_by_role("link", name="Skip to content").focus()
    for _ in ["Endpoints", "Create endpoint", "Chat test", "Keys", "GPUs"]:
        page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="GPUs")).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="GPUs")).to_be_visible()
    if _nvml_gpu_count():
        expect(page.get_by_role("region", name="GPU 0")).to_contain_text("Utilisation")
    else:
        notice = page.get_by_role("status").filter(has_text="No GPU information")
        expect(notice).to_contain_text("NVML")
        expect(notice).to_contain_text("Reason:")
    snap(page, "gpus")

    # What the page makes of NVML's answer on a GPU box: an answer of the API's own model, served in its place.
    from appliance.api.manage.views import GpuHolder, GpuList, GpuView

    gpu = GpuView(index=0, uuid="GPU-5c3f0a2e-0000-4000-8000-000000000000", name="NVIDIA H100 80GB HBM3", memory_total=85_520_809_984,
                  memory_used=61_203_988_480, utilization_gpu=93, utilization_memory=71, mig_mode="disabled",
                  processes=[{"pid": 4242, "used_memory": 61_000_000_000}], allowed=True, held_by=[GpuHolder(replica="llama-1a2b3c", share=None)])
    idle = gpu.model_copy(update={"index": 1, "uuid": "GPU-77aa", "memory_used": 0, "utilization_gpu": 0, "processes": [], "held_by": []})
    answer = GpuList(available=True, data=[gpu, idle]).model_dump_json()
    page.route("**/api/v1/gpus", lambda route: route.fulfill(status=200, content_type="application/json", body=answer))
    page.reload()
    card = page.get_by_role("region", name="GPU 0")
    expect(card).to_contain_text("NVIDIA H100 80GB HBM3")
    expect(card).to_contain_text("93 %")
    expect(card).to_contain_text("57.0 GiB of 79.6 GiB")
    expect(card).to_contain_text("llama-1a2b3c — whole GPU")
    expect(page.get_by_role("region", name="GPU 1")).to_contain_text("no replica")
    snap(page, "gpus-nvml")


def _http(server: ServerProcess, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def test_a_cookie_post_without_the_csrf_token_is_refused(server: ServerProcess) -> None:
    status, session, headers = _http(server, "POST", "/ui/login", {"key": admin_key(server)})
    assert status == 200 and session["csrf_token"]
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert cookie.startswith("appliance_session=") and "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    status, body, _ = _http(server, "POST", "/api/v1/keys", {"name": "forged"}, {"Cookie": cookie})
    assert status == 403 and body["error"]["code"] == "csrf_token_missing"
    status, body, _ = _http(server, "DELETE", f"/api/v1/keys/{session['key_id']}?force=true", None, {"Cookie": cookie})
    assert status == 403 and body["error"]["code"] == "csrf_token_missing"
    status, body, _ = _http(server, "POST", "/api/v1/keys", {"name": "made"}, {"Cookie": cookie, "X-CSRF-Token": session["csrf_token"]})
    assert status == 201 and body["key"].startswith("ak-")
    status, body, _ = _http(server, "POST", "/api/v1/keys", {"name": "bearer"}, {"Authorization": f"Bearer {admin_key(server)}"})
    assert status == 201  # bearer keys work as before, without a token
