"""A small synchronous client of the admin API, for the CLI and scripts."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.security.auth import read_key_file
from appliance.security.tls import client_context


def server_url(config: Config) -> str:
    """Where the running server listens: what it wrote at start, else the configured address."""
    try:
        return str(json.loads(config.server_file.read_text())["url"])
    except (OSError, ValueError, KeyError):
        host = config.server.host if config.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"{config.server.scheme}://{host}:{config.server.port}"


class AdminClient:
    def __init__(self, url: str, key: str, timeout: float = 30.0, ca_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._tls = client_context(ca_file) if self.url.startswith("https:") else None

    @classmethod
    def from_config(cls, config: Config, *, url: str | None = None, key_file: Path | None = None) -> AdminClient:
        return cls(url or server_url(config), read_key_file(key_file or config.admin_key_path), ca_file=config.server.tls_cert)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, query: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body, query, self.timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw or b"null")
        except ValueError:  # not the appliance answering (a proxy's page, another server on the port)
            raise ApplianceError(f"{method} {path}: the answer from {self.url} is not JSON: {raw[:200]!r}", status=502, code="bad_answer") from None

    def lines(self, path: str, query: dict[str, Any] | None = None, *, method: str = "GET", body: dict[str, Any] | None = None) -> Iterator[str]:
        """A text response line by line as it arrives (follow=1, a validation's events), with no read timeout."""
        with self._open(method, path, body, query, None) as resp:
            for raw in resp:
                yield raw.decode("utf-8", errors="replace").rstrip("\n")

    def _open(self, method: str, path: str, body: dict[str, Any] | None, query: dict[str, Any] | None, timeout: float | None) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(req, timeout=timeout, context=self._tls)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                raise ApplianceError(f"{method} {path}: HTTP {exc.code}: {raw[:200]!r}", status=exc.code, code="http_error") from None
            raise ApplianceError(
                err.get("message", "error"),
                status=exc.code,
                code=err.get("code") or "http_error",
                param=err.get("param"),
                problems=err.get("problems") or (),
            ) from None
        except urllib.error.URLError as exc:
            raise ApplianceError(
                f"cannot reach the appliance at {self.url}: {exc.reason} (is `appliance serve` running?)",
                status=503,
                code="unreachable",
            ) from None
