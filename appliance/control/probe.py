"""One health probe of one replica (the effect; the decisions are in health.py)."""

from __future__ import annotations

import aiohttp

from appliance.domain.specs import HealthCheck


async def probe(session: aiohttp.ClientSession, base_url: str, check: HealthCheck, *, deep_model: str | None = None) -> tuple[bool, str]:
    """GET the health path within max_wait_time; pass = expected status. Deep: then a 1-token completion."""
    timeout = aiohttp.ClientTimeout(total=check.max_wait_time)
    try:
        async with session.get(base_url + check.path, timeout=timeout, allow_redirects=False) as resp:
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
