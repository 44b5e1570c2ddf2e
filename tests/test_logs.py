"""The server log: quiet when idle, one line per meaningful event, JSON on request, and a request id
that travels from the client to the worker, the error body, the response and the log."""

from __future__ import annotations

import json
import logging
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_supervisor import fake_folder, server_config

from appliance.logs import REQUEST_ID, JsonFormatter, PlainFormatter, setup_logging


def _record(message: str, **extra: Any) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "appliance.events", "levelno": logging.INFO, "levelname": "INFO", "msg": message, **extra})
    return record


@pytest.fixture
def restored_logging() -> Any:
    """setup_logging replaces the root logger's handlers: give the next tests back pytest's own. (A handler
    left on this test's captured stderr, closed after it, made every later log line print a traceback.)"""
    root, scheduler = logging.getLogger(), logging.getLogger("apscheduler")
    handlers, level, scheduler_level = root.handlers[:], root.level, scheduler.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    scheduler.setLevel(scheduler_level)


def test_json_lines_carry_the_request_id_and_event_fields(capsys: pytest.CaptureFixture[str], restored_logging: None) -> None:
    setup_logging("info", "json")
    try:
        token = REQUEST_ID.set("req-42")
        logging.getLogger("appliance.events").info("endpoint.created endpoint chat created", extra={"kind": "endpoint.created", "endpoint": "chat"})
        REQUEST_ID.reset(token)
        logging.getLogger("apscheduler.executors.default").info('Running job "Autoscaler.evaluate"')  # chatter: not shown
        line = capsys.readouterr().err.strip()
    finally:
        logging.getLogger().handlers[:] = []
    entry = json.loads(line)
    assert entry["request_id"] == "req-42" and entry["kind"] == "endpoint.created" and entry["endpoint"] == "chat"
    assert entry["level"] == "info" and entry["logger"] == "appliance.events" and entry["time"].endswith("Z")


def test_plain_lines_name_the_request() -> None:
    record = _record("no replica ready")
    record.request_id = "abc"
    assert PlainFormatter().format(record).endswith("no replica ready [request abc]")
    record.request_id = None
    assert JsonFormatter().format(record).startswith('{"time"')


def _call(url: str, path: str, key: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


@pytest.mark.process
def test_the_server_log_tells_what_happened_in_json_with_request_ids(server_factory: Any, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "chat")
    config = server_config(tmp_path, f'[logging]\nformat = "json"\n[gateway]\naccess_log = true\n[[endpoints]]\nname = "chat"\nmodel_folder = "{folder}"\n')
    server = server_factory(config).start()
    admin = (tmp_path / "state" / "admin.key").read_text().strip()
    wait_for(lambda: _call(server.url, "/api/v1/endpoints/chat", admin)[1]["status"] == "HEALTHY", what="chat to be healthy")
    status, key, _ = _call(server.url, "/api/v1/keys", admin, {"name": "logged"}, headers={"X-Request-ID": "make-key-1"})
    assert status == 201

    # the client's id reaches the worker and comes back on the response
    status, echoed, headers = _call(server.url, "/endpoints/chat/echo/x", admin, headers={"X-Request-ID": "client-id-7"})
    assert status == 200 and headers["X-Request-ID"] == "client-id-7"
    assert [v for k, v in echoed["headers"].items() if k.lower() == "x-request-id"] == ["client-id-7"]
    # without one the appliance makes one, and an error body names it
    status, error, headers = _call(server.url, "/v1/chat/completions", key["key"], {"model": "nope", "messages": []})
    assert status == 404 and error["error"]["request_id"] == headers["X-Request-ID"] and len(headers["X-Request-ID"]) == 16
    status, _, _ = _call(server.url, "/v1/chat/completions", key["key"], {"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                         headers={"X-Request-ID": "chat-call-1"})
    assert status == 200
    records = _call(server.url, "/api/v1/requests?endpoint=chat", admin)[1]["data"]
    assert "chat-call-1" in [r["request_id"] for r in records]  # the request record names it too
    status, error, headers = _call(server.url, "/v1/chat/completions", key["key"], {"model": "nope"}, headers={"X-Request-ID": "bad id\twith tab"})
    assert headers["X-Request-ID"] != "bad id\twith tab"  # not a header value to pass on
    assert _call(server.url, f"/api/v1/keys/{key['id']}", admin, headers={})[0] == 200
    req = urllib.request.Request(server.url + f"/api/v1/keys/{key['id']}", method="DELETE", headers={"Authorization": f"Bearer {admin}"})
    urllib.request.urlopen(req, timeout=10).close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0

    lines = [json.loads(line) for line in server.output().splitlines() if line.strip()]  # every line is JSON
    kinds = [e.get("kind") for e in lines if e["logger"] == "appliance.events"]
    for kind in ("endpoint.created", "replica.starting", "replica.healthy", "endpoint.status", "key.created", "key.revoked", "server.started",
                 "replica.draining", "server.stopped"):
        assert kind in kinds, (kind, kinds)
    assert not [e for e in lines if e["logger"].startswith("apscheduler")], "scheduler chatter in the log"
    assert any("stopping: 1 replicas drain and stop" in e["message"] for e in lines)
    created = next(e for e in lines if e.get("kind") == "key.created" and "logged" in e["message"])
    assert created.get("request_id") == "make-key-1", created  # an event an API call made names that call
    healthy = next(e for e in lines if e.get("kind") == "replica.healthy")
    assert healthy["endpoint"] == "chat" and "replica" in healthy["details"]
    access = [e for e in lines if e["logger"] == "appliance.api.manage.access"]
    assert any("request=chat-call-1" in e["message"] and "/v1/chat/completions" in e["message"] for e in access), access[-3:]
    assert len(lines) - len(access) < 60, f"{len(lines) - len(access)} lines for one endpoint, one key and a few requests"


def test_a_clients_malformed_http_is_one_line_and_a_handlers_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from appliance.logs import ClientHttpErrors

    def failed(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("203.0.113.7",), sys.exc_info())

    caplog.set_level(logging.INFO, logger="aiohttp.server")
    bad = failed(BadHttpMessage("Invalid char in url path:\n\n  b'GET /\\x01\x1b[31m HTTP/1.1'\n         ^"))
    assert ClientHttpErrors().filter(bad) is True
    line = PlainFormatter().format(bad)
    assert "\n" not in line and "\x1b" not in line and "Traceback" not in line
    assert " INFO aiohttp.server: bad HTTP request from 203.0.113.7: 400 Invalid char in url path: b'GET /" in line
    bug = failed(RuntimeError("a handler's bug"))
    assert ClientHttpErrors().filter(bug) is True and "Traceback" in PlainFormatter().format(bug)
    caplog.set_level(logging.WARNING, logger="aiohttp.server")  # served at WARNING: the client's errors are left out
    assert ClientHttpErrors().filter(failed(BadHttpMessage("Bad status line"))) is False
