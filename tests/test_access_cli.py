"""Keys, tokens, service accounts, usage and HTTPS through the CLI against `appliance serve` processes."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import run_cli, wait_for, write_config
from cryptography import x509

pytestmark = pytest.mark.process


def cli(config: Path, *args: str) -> Any:
    result = run_cli(*args, "--json", config=config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def get(url: str, key: str, context: ssl.SSLContext | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_keys_tokens_accounts_and_usage_through_the_cli(server_factory: Any, tmp_path: Path, model_folder: Path) -> None:
    config = write_config(tmp_path / "config.toml", f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n[auth]\nreload_seconds = 0.3\n')
    server = server_factory(config).start()
    cli(config, "endpoint", "create", "chat", "--model-folder", str(model_folder), "--runtime", "vllm", "--replicas", "0",
        "--secret-env", "HF_TOKEN=hf_secret_value")
    shown = run_cli("endpoint", "show", "chat", "--json", config=config)
    assert "hf_secret_value" not in shown.stdout and "********" in shown.stdout

    plain = run_cli("key", "create", "--name", "ci", "--scopes", "inference,read", "--endpoints", "chat", "--expires", "30d",
                    "--rpm", "10", "--tpm", "1000", "--meta", "owner=ops", config=config)
    assert plain.returncode == 0, plain.stderr
    key = plain.stdout.splitlines()[0]
    assert key.startswith("ak-") and "shown once" in plain.stdout
    listed = cli(config, "key", "list")
    (ci,) = [k for k in listed["data"] if k["name"] == "ci"]
    assert ci["scopes"] == ["inference", "read"] and ci["endpoints"] == ["chat"] and ci["rpm_limit"] == 10 and ci["metadata"] == {"owner": "ops"}
    assert get(server.url + "/api/v1/endpoints", key) == 200  # read scope
    updated = cli(config, "key", "update", ci["id"], "--rpm", "0", "--expires", "never", "--endpoints", "all")
    assert updated["rpm_limit"] is None and updated["expires_at"] is None and updated["endpoints"] is None
    table = run_cli("key", "list", config=config)
    assert table.stdout.split()[:9] == ["ID", "NAME", "PREFIX", "STATUS", "SCOPES", "ENDPOINTS", "EXPIRES", "LAST", "USED"]
    cli(config, "key", "revoke", ci["id"])
    assert get(server.url + "/api/v1/endpoints", key) == 401
    assert [k["status"] for k in cli(config, "key", "list", "--all")["data"] if k["id"] == ci["id"]] == ["revoked"]
    assert run_cli("key", "update", ci["id"], config=config).returncode == 2  # nothing to change: a usage error

    token = cli(config, "endpoint", "token", "create", "chat", "--duration", "7d")
    assert token["token"].startswith("et-") and [t["id"] for t in cli(config, "endpoint", "token", "list", "chat")["data"]] == [token["id"]]
    cli(config, "endpoint", "token", "revoke", "chat", token["id"])
    both = run_cli("endpoint", "token", "create", "chat", config=config)
    assert both.returncode == 2 and "--duration" in both.stderr

    account = cli(config, "service-account", "create", "bot", "--role", "viewer")
    assert account["client_secret"] and [a["name"] for a in cli(config, "service-account", "list")["data"]] == ["bot"]
    assert cli(config, "service-account", "disable", account["id"])["disabled"] is True
    assert cli(config, "service-account", "enable", account["id"])["disabled"] is False
    assert cli(config, "oauth", "rotate-key")["rotated"] is True
    usage = cli(config, "usage", "--since", "1h")
    assert usage["totals"]["requests"] == 0
    assert run_cli("usage", config=config).stdout.splitlines()[-1].split()[:2] == ["total", "0"]

    # an admin key reset offline, with the server running: the new key works at once, the old one within reload_seconds
    old = (tmp_path / "state" / "admin.key").read_text().strip()
    assert run_cli("admin-key", "reset", config=config).returncode == 0
    new = (tmp_path / "state" / "admin.key").read_text().strip()
    assert get(server.url + "/api/v1/keys", new) == 200
    wait_for(lambda: get(server.url + "/api/v1/keys", old) == 401, timeout=10, what="the reset key to be refused")


def test_tls_init_then_https_for_the_cli_and_the_sdk(server_factory: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "config.toml", f'[server]\nport = 0\nstate_dir = "{state}"\n')
    made = run_cli("tls", "init", "--name", "edge-box.local", config=config)
    assert made.returncode == 0, made.stderr
    cert_path, key_path = state / "tls" / "cert.pem", state / "tls" / "key.pem"
    assert f'tls_cert = "{cert_path}"' in made.stdout and (key_path.stat().st_mode & 0o777) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"edge-box.local", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert run_cli("tls", "init", config=config).returncode == 2  # files exist: --force needed

    write_config(config, config.read_text() + f'tls_cert = "{cert_path}"\ntls_key = "{key_path}"\n')
    server = server_factory(config).start()
    assert server.url.startswith("https://127.0.0.1:")
    key = (state / "admin.key").read_text().strip()
    assert get(server.url + "/api/v1/endpoints", key, ssl.create_default_context(cafile=str(cert_path))) == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(server.url + "/healthz", key, ssl.create_default_context())
    assert cli(config, "endpoint", "list")["data"] == []  # the CLI trusts the configured certificate
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert_path))))
    assert client.models.list().data == []

    half = write_config(tmp_path / "half.toml", f'[server]\nstate_dir = "{state}"\ntls_cert = "{cert_path}"\n')
    checked = run_cli("check-config", str(half))
    assert checked.returncode == 1 and "tls_cert and tls_key go together" in checked.stderr
