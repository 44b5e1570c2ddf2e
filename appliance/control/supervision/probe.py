"""One health probe of one replica (the effect; the decisions are in health.py)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp

from appliance.domain.specs import HealthCheck


async def _accepts(base_url: str, timeout: float) -> tuple[bool, str]:
    url = urlsplit(base_url)
    try:
        async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow the probe loop's cancel
            _, writer = await asyncio.open_connection(url.hostname, url.port)
    except TimeoutError:
        return False, f"TCP connect timed out after {timeout:g}s"
    except OSError as exc:
        return False, f"TCP connect failed: {exc.strerror or exc}"
    writer.close()
    return True, f"port {url.port} accepts connections"


async def probe(session: aiohttp.ClientSession, base_url: str, check: HealthCheck, *, deep_model: str | None = None) -> tuple[bool, str]:
    """GET the health path within max_wait_time, following redirects as Backend.AI's prober does;
    pass = expected status. Deep: then a 1-token completion. No path: the port accepts a connection."""
    if check.path is None:
        return await _accepts(base_url, check.max_wait_time)
    timeout = aiohttp.ClientTimeout(total=check.max_wait_time)
    try:
        async with session.get(base_url + check.path, timeout=timeout) as resp:
            status = resp.status
        if status != check.expected_status_code:
            return False, f"GET {check.path}: HTTP {status} (expected {check.expected_status_code})"
        if deep_model is None:
            return True, f"GET {check.path}: HTTP {status}"
        body = {"model": deep_model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
        async with session.post(base_url + "/v1/completions", json=body, timeout=timeout) as resp:
            deep_status = resp.status
            text = (await resp.content.read(300)).decode(errors="replace")
        if deep_status != 200:
            return False, f"deep probe: POST /v1/completions: HTTP {deep_status}: {text}"
        return True, f"GET {check.path}: HTTP {status}; 1-token completion OK"
    except TimeoutError:
        return False, f"timed out after {check.max_wait_time:g}s"
    except aiohttp.ClientError as exc:
        return False, f"connection failed: {exc.__class__.__name__}: {exc}"


async def asleep(session: aiohttp.ClientSession, base_url: str, timeout: float = 5.0) -> bool | None:
    """vLLM's GET /is_sleeping (served with VLLM_SERVER_DEV_MODE=1): True or False, None when the engine
    does not answer it (no sleep API). /health stays 200 while an engine sleeps: only this tells."""
    try:
        async with session.get(base_url + "/is_sleeping", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    value = body.get("is_sleeping") if isinstance(body, dict) else None
    return value if isinstance(value, bool) else None
