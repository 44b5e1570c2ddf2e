"""kill -9 of `appliance serve` under a steady load, then a restart on the same config and state:
what the admin API created is back as it was, the usage lost is at most one flush interval's worth
(and nothing is counted twice), and no worker process of the killed run survives the restart."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from conftest import ServerProcess, wait_for
from test_supervisor import _alive, fake_folder, server_config

pytestmark = pytest.mark.process

RATE = 50.0  # requests per second, the steady load
FLUSH = 1.0  # [auth] usage_flush_seconds
LOAD_SECONDS = 3.0  # of answered load before the kill: a few flushes have landed by then
# The flush job is not exactly periodic: APScheduler wakes it a little late, and a batch taken but not yet
# committed when the kill lands is lost along with the interval before it. Both take milliseconds on an idle
# box; 0.2 s of load covers them on a busy 2-core one.
FLUSH_SLACK = 0.2
# The kill is aimed this far into a flush interval (counted from a flush seen landing in the database): late,
# when most of an interval's usage is in memory only, yet before the next flush even if that one was seen late.
KILL_AT = 0.9
MODEL = "steady"
MAX_TOKENS = 4


@dataclass
class Sent:
    """One request of the load, as the client saw it."""

    started: float  # time.monotonic()
    ended: float | None = None
    status: int | None = None
    usage: tuple[int, int] | None = None  # (prompt, completion) of a complete 200 answer
    error: str | None = None


class SteadyLoad:
    """Chat completions at RATE per second on a deadline schedule (request i is due at start + i / RATE,
    however long the earlier ones take), from a thread with an event loop of its own."""

    def __init__(self, url: str, key: str, rate: float) -> None:
        self.url, self.key, self.rate = url, key, rate
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="steady-load", daemon=True)

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the load generator did not stop"

    def answered(self) -> list[Sent]:
        return [s for s in list(self.sent) if s.usage is not None]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            start, i = loop.time(), 0
            while not self._stop.is_set():
                delay = start + i / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                record = Sent(started=time.monotonic())
                self.sent.append(record)
                task = asyncio.create_task(self._one(session, record))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.gather(*pending)

    async def _one(self, session: aiohttp.ClientSession, record: Sent) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
        try:
            async with session.post(self.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {self.key}"}) as resp:
                record.status = resp.status
                data = await resp.json(content_type=None)  # raises on a body cut off by the kill
            if resp.status == 200:
                record.usage = (data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"])
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.ended = time.monotonic()


def call(url: str, path: str, credential: str, *, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"}
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def oauth_token(url: str, client_id: str, secret: str) -> str:
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    req = urllib.request.Request(url + "/oauth/token", data=b"grant_type=client_credentials", method="POST",
                                 headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["access_token"])


def chat(url: str, credential: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "again"}], "max_tokens": 1}
    return call(url, "/v1/chat/completions", credential, method="POST", body=body)[0]


def flushed_requests(db: Path, key_id: str) -> int:
    """The key's requests committed to the state database (read-only: WAL lets the appliance write meanwhile)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return int(conn.execute("select coalesce(sum(requests), 0) from usage where key_id = ?", [key_id]).fetchone()[0])


def without(view: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k not in fields}


def test_kill_9_under_load_then_restart_keeps_state_loses_at_most_one_flush_and_no_worker(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    folder = fake_folder(tmp_path, MODEL, "--spawn-child")  # each worker leaves a helper in its group, as engines do
    config = server_config(tmp_path, f"[auth]\nusage_flush_seconds = {FLUSH}\n")
    admin_key = tmp_path / "state" / "admin.key"

    first = server_factory(config).start()
    url = first.url

    def admin(path: str, method: str = "GET", body: Any = None, *, server: ServerProcess = first) -> Any:
        status, answer = call(server.url, path, admin_key.read_text().strip(), method=method, body=body)
        assert 200 <= status < 300, (method, path, status, answer)
        return answer

    def healthy_replicas(server: ServerProcess) -> list[dict[str, Any]] | None:
        live = [r for r in admin(f"/api/v1/endpoints/{MODEL}/replicas", server=server)["data"] if r["state"] == "HEALTHY"]
        return live if len(live) == 2 and admin(f"/api/v1/endpoints/{MODEL}", server=server)["status"] == "HEALTHY" else None

    def created(server: ServerProcess) -> dict[str, Any]:
        """What the admin API shows of what it created; last-used times and live status move on their own."""
        return {
            "endpoint": without(admin(f"/api/v1/endpoints/{MODEL}", server=server), "updated_at", "replica_counts", "status_message"),
            "rules": admin(f"/api/v1/endpoints/{MODEL}/autoscaling-rules", server=server)["data"],
            "keys": [without(k, "last_used_at") for k in admin("/api/v1/keys", server=server)["data"]],
            "tokens": [without(t, "last_used_at") for t in admin(f"/api/v1/endpoints/{MODEL}/tokens", server=server)["data"]],
            "accounts": admin("/api/v1/service-accounts", server=server)["data"],
        }

    # One of everything the admin API creates, before the load.
    admin("/api/v1/endpoints", "POST", {"name": MODEL, "model_folder": str(folder), "replicas": 2, "max_replicas": 3, "description": "kill -9 target"})
    rule = admin(f"/api/v1/endpoints/{MODEL}/autoscaling-rules", "POST", {
        "metric_source": "gateway", "metric_name": "latency_p95", "comparator": "greater_than", "threshold": 60, "step_size": 1,
        "max_replicas": 3, "cooldown_seconds": 120, "window_seconds": 30,
    })  # latency never reaches 60 s here: the rule stays put and its view stays comparable
    load_key = admin("/api/v1/keys", "POST", {"name": "load", "scopes": ["inference"], "endpoints": [MODEL], "metadata": {"team": "faults"}})
    reader = admin("/api/v1/keys", "POST", {"name": "reader", "scopes": ["read"], "expires_in": "30d", "rpm_limit": 600})
    token = admin(f"/api/v1/endpoints/{MODEL}/tokens", "POST", {"duration": "1h", "name": "bai token"})
    account = admin("/api/v1/service-accounts", "POST", {"name": "reporting", "role": "user", "metadata": {"owner": "ops"}})
    access_token = oauth_token(url, account["client_id"], account["client_secret"])

    old = wait_for(lambda: healthy_replicas(first), timeout=30, what="2 healthy replicas")
    assert chat(url, access_token) == 200 and chat(url, token["token"]) == 200
    before = created(first)
    assert [r["id"] for r in before["rules"]] == [rule["id"]]
    assert {load_key["id"], reader["id"]} <= {k["id"] for k in before["keys"]}
    assert [t["id"] for t in before["tokens"]] == [token["id"]] and [a["id"] for a in before["accounts"]] == [account["id"]]
    workers = {r["pid"] for r in old}
    helpers = {c.pid for pid in workers for c in psutil.Process(pid).children(recursive=True)}
    assert len(helpers) == 2

    # No admin call from here to the kill: reading keys or usage flushes usage, off the job's schedule.
    load = SteadyLoad(url, load_key["key"], RATE).start()
    try:
        wait_for(lambda: len(load.answered()) >= RATE * LOAD_SECONDS, timeout=LOAD_SECONDS + 20, what=f"{RATE * LOAD_SECONDS:.0f} answered requests")
        # Aim at the worst moment rather than a random one: late in an interval, nearly FLUSH seconds of answers unflushed.
        db = tmp_path / "state" / "appliance.db"
        seen = flushed_requests(db, load_key["id"])
        landed = wait_for(lambda: flushed_requests(db, load_key["id"]) != seen and time.monotonic(), timeout=5 * FLUSH, interval=0.01, what="a usage flush")
        wait_for(lambda: time.monotonic() >= landed + KILL_AT * FLUSH, timeout=2 * FLUSH, interval=0.005, what="the moment of the kill")
        assert first.proc is not None
        killed_at = time.monotonic()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        load.stop()

    sent = [s for s in load.sent if s.started < killed_at]
    answered = load.answered()
    in_flight = [s for s in sent if s.usage is None]  # sent before the kill, never answered in full
    early = [(s.status, s.error) for s in in_flight if s.ended is None or s.ended < killed_at]
    assert not early, f"requests failed before the kill: {early}"
    assert not [s for s in answered if s.started >= killed_at]
    usages = {s.usage for s in answered}
    assert len(usages) == 1, usages  # every answer the same size: tokens follow from request counts
    ((prompt, completion),) = usages
    duration = killed_at - sent[0].started
    outstanding = max(sum(o.started <= s.started < (o.ended or killed_at) for o in sent) for s in sent)

    second = server_factory(config).start()
    # Usage first, before anything else uses the load key.
    usage = admin(f"/api/v1/usage?key={load_key['id']}&since=1h", server=second)
    totals = usage["totals"]
    recorded = totals["requests"]
    lost = len(answered) - recorded
    # What the kill loses is what was answered since the last committed flush: at most FLUSH (+ slack) seconds of
    # answers. At RATE that is RATE × (FLUSH + FLUSH_SLACK) requests, plus the ones already in flight when that
    # window opened, which are answered inside it too: at most the most requests the load ever had outstanding.
    bound = RATE * (FLUSH + FLUSH_SLACK) + outstanding
    print(
        f"\nkill -9 under load: sent {len(sent)} in {duration:.2f}s ({len(sent) / duration:.1f} req/s), answered {len(answered)}, "
        f"in flight at the kill {len(in_flight)} (at most {outstanding} at once), recorded {recorded}, lost {lost} (bound {bound:.0f} at flush interval {FLUSH}s); "
        f"tokens answered {len(answered) * (prompt + completion)}, recorded {totals['prompt_tokens'] + totals['completion_tokens']}"
    )
    assert recorded <= len(answered) + len(in_flight), "usage counted twice"
    assert 0 <= lost <= bound, f"lost {lost} requests' usage, more than one flush interval's worth ({bound:.0f})"
    assert (totals["prompt_tokens"], totals["completion_tokens"], totals["errors"]) == (recorded * prompt, recorded * completion, 0)
    assert [(r["key_id"], r["endpoint"]) for r in usage["data"]] in ([(load_key["id"], MODEL)], [(load_key["id"], MODEL)] * 2)  # 2: an hour boundary

    new = wait_for(lambda: healthy_replicas(second), timeout=30, what="2 healthy replicas after the restart")
    assert not {r["pid"] for r in new} & workers
    survivors = [p for p in workers | helpers if _alive(p)]
    assert not survivors, f"processes of the killed run survived the restart: {survivors}"
    stopped = admin("/api/v1/events?kind=replica.orphan_stopped", server=second)["data"]
    assert len(stopped) == 2, stopped  # the restart ended both groups' helpers itself

    after = created(second)
    for what, was in before.items():
        assert after[what] == was, what
    assert admin(f"/api/v1/keys/{load_key['id']}", server=second)["last_used_at"] is not None  # written by a flush before the kill

    # Every credential issued before the kill still gets in: the key, the endpoint token, the access token
    # (signed with the key kept in the state dir), the account's secret, and a read key on the admin API.
    assert chat(second.url, load_key["key"]) == 200
    assert chat(second.url, token["token"]) == 200
    assert chat(second.url, access_token) == 200
    assert chat(second.url, oauth_token(second.url, account["client_id"], account["client_secret"])) == 200
    assert call(second.url, "/api/v1/endpoints", reader["key"])[0] == 200
