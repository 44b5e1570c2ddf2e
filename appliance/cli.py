"""The `appliance` command. Server commands run here; endpoint commands talk to the running
server's admin API with the admin key file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import CONFIG_ENV, Config, absolute, default_config_path, load_config, read_toml
from appliance.errors import ApplianceError


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config or default_config_path())


# --- server-side commands ----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.server import serve

    return serve(_config(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from appliance.endpoints import check_declared

    path = Path(args.path or args.config or default_config_path())
    try:
        config = load_config(path)
    except ApplianceError as exc:
        for p in exc.problems or [exc.message]:
            print(f"{path}: {p}" if not p.startswith(str(path)) else p, file=sys.stderr)
        return 1
    problems = check_declared(list(config.endpoints))
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{path}: OK ({len(config.endpoints)} endpoint(s) declared, state in {config.server.state_dir})")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from appliance.demo_model import write_demo_model

    folder = write_demo_model(Path(args.dir), seed=args.seed, overwrite=args.force)
    print(f"wrote a tiny random-weight causal LM to {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo_model import write_demo_config, write_demo_model
    from appliance.server import serve

    state = Path(args.state_dir).resolve()
    folder = state / "models" / "demo"
    if not (folder / "config.json").exists():
        write_demo_model(folder, seed=0, overwrite=True)
    path = write_demo_config(state, folder, port=args.port)
    key = state / "admin.key"
    url = f"http://127.0.0.1:{args.port}"
    print(
        f"demo: model folder {folder}\ndemo: config {path}\ndemo: admin key in {key}\n"
        f"demo: try (the first call waits until the replica is up):\n"
        f"  curl -s {url}/v1/chat/completions -H \"Authorization: Bearer $(cat {key})\" -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"demo\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'\n"
        f"  {sys.executable} -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}/v1\", api_key=open(\"{key}\").read().strip()); "
        f"print(c.chat.completions.create(model=\"demo\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}], max_tokens=16))'",
        flush=True,
    )
    return serve(load_config(path))


def cmd_admin_key_reset(args: argparse.Namespace) -> int:
    from appliance.auth import reset_admin_key
    from appliance.store import open_database

    config = _config(args)
    db = open_database(config.db_path)
    try:
        reset_admin_key(db, config.admin_key_path, time.time())
    finally:
        db.close()
    print(f"a new admin key is in {config.admin_key_path}; the old bootstrap key no longer works")
    return 0


# --- admin API commands --------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from appliance.client import AdminClient

    return AdminClient.from_config(_config(args), url=args.url, key_file=Path(args.key_file) if args.key_file else None)


def _kv(pairs: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ApplianceError(f"{flag} takes KEY=VALUE (got {pair!r})", code="usage")
        out[key] = value
    return out


def _spec_file(path: str) -> dict[str, Any]:
    file = Path(path)
    data = read_toml(file, what="spec file", code="usage")
    if isinstance(data.get("model_folder"), str):
        data["model_folder"] = absolute(data["model_folder"], file.resolve().parent)
    return data


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """Endpoint fields from -f and flags; flags win over the file."""
    body: dict[str, Any] = _spec_file(args.file) if args.file else {}
    if args.model_folder is not None:
        body["model_folder"] = str(Path(args.model_folder).expanduser().resolve())
    simple = {
        "runtime": args.runtime,
        "definition_file": args.definition_file,
        "served_model_name": args.served_model_name,
        "replicas": args.replicas,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "description": args.description,
        "public": args.public,
        "continuous_batching": args.continuous_batching,
        "max_surge": args.max_surge,
        "drain_timeout_seconds": args.drain_timeout,
        "idle_timeout_seconds": args.idle_timeout,
        "wake_timeout_seconds": args.wake_timeout,
    }
    body.update({k: v for k, v in simple.items() if v is not None})
    resources = {"gpus": args.gpus, "gpu_share": args.gpu_share, "cpu": args.cpu, "mem": args.mem}
    if any(v is not None for v in resources.values()):
        body["resources"] = {**body.get("resources", {}), **{k: v for k, v in resources.items() if v is not None}}
    if args.env:
        body["environ"] = {**body.get("environ", {}), **_kv(args.env, "--env")}
    if args.secret_env:
        body["secret_environ"] = {**body.get("secret_environ", {}), **_kv(args.secret_env, "--secret-env")}
    if args.extra_arg:
        body["extra_args"] = list(args.extra_arg)
    if args.alias:
        body["aliases"] = list(args.alias)
    return body


def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def _gpu_text(resources: dict[str, Any]) -> str:
    if resources.get("gpus"):
        return f"{resources['gpus']}×GPU"
    if resources.get("gpu_share"):
        return f"{resources['gpu_share']:g} GPU"
    return "-"


def _show_endpoint(ep: dict[str, Any]) -> None:
    hc = ep["health_check"]
    lines = [
        ("name", ep["name"]),
        ("status", ep["status"] + (f" ({ep['status_message']})" if ep.get("status_message") else "")),
        ("runtime", ep["runtime"]),
        ("model folder", ep["model_folder"]),
        ("definition file", ep.get("definition_file") or "-"),
        ("served model name", ep["served_model_name"]),
        ("aliases", ", ".join(ep["aliases"]) or "-"),
        ("replicas", f"{ep['desired_replicas']} desired; configured {ep['replicas']} (min {ep['min_replicas']}, max {ep['max_replicas']})"),
        ("scaling", f"surge {ep['max_surge']}, drain {ep['drain_timeout_seconds']:g}s"
         + (f", idle to zero after {ep['idle_timeout_seconds']:g}s, wake up to {ep['wake_timeout_seconds']:g}s" if ep.get("idle_timeout_seconds") else "")),
        ("resources", json.dumps({k: v for k, v in ep["resources"].items() if v not in (None, 0)}) or "{}"),
        ("environ", ", ".join(f"{k}={v}" for k, v in ep["environ"].items()) or "-"),
        ("extra args", " ".join(ep["extra_args"]) or "-"),
        ("health check", f"GET {hc['path']} every {hc['interval']:g}s, expect {hc['expected_status_code']}, "
         f"{hc['max_retries']} retries, timeout {hc['max_wait_time']:g}s, initial delay {hc['initial_delay']:g}s"),
        ("access", "public" if ep["public"] else "private (key required)"),
        ("environment", json.dumps(ep["environment"]) if ep.get("environment") else "-"),
        ("from folder", ", ".join(ep["inherited"]) or "-"),
        ("source", ep["source"]),
        ("generation", str(ep["generation"])),
        ("created", ep["created_at"]),
        ("updated", ep["updated_at"]),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def _emit(args: argparse.Namespace, data: Any, human: Any) -> int:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)
    return 0


def cmd_endpoint_create(args: argparse.Namespace) -> int:
    body = _fields(args)
    if args.name:
        body["name"] = args.name
    if "name" not in body:
        raise ApplianceError("endpoint create needs a NAME (or name in the -f file)", code="usage")
    ep = _client(args).request("POST", "/api/v1/endpoints", body)
    return _emit(args, ep, lambda e: print(f"created endpoint {e['name']} ({e['runtime']}, {e['replicas']} replica(s)): {e['status']}"))


def cmd_endpoint_update(args: argparse.Namespace) -> int:
    body = _fields(args)
    body.pop("name", None)
    if not body:
        raise ApplianceError("nothing to change: give flags or -f spec.toml", code="usage")
    ep = _client(args).request("PATCH", f"/api/v1/endpoints/{args.name}", body)
    return _emit(args, ep, lambda e: print(f"updated endpoint {e['name']} (generation {e['generation']})"))


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/api/v1/endpoints")

    def human(d: dict[str, Any]) -> None:
        rows = [
            [e["name"], e["runtime"], e["status"], str(e["desired_replicas"]), f"{e['min_replicas']}-{e['max_replicas']}",
             _gpu_text(e["resources"]), "public" if e["public"] else "private", e["source"], e["model_folder"]]
            for e in d["data"]
        ]
        if not rows:
            print("no endpoints")
            return
        _print_table(rows, ["NAME", "RUNTIME", "STATUS", "REPLICAS", "RANGE", "GPU", "ACCESS", "SOURCE", "MODEL FOLDER"])

    return _emit(args, data, human)


def cmd_endpoint_show(args: argparse.Namespace) -> int:
    return _emit(args, _client(args).request("GET", f"/api/v1/endpoints/{args.name}"), _show_endpoint)


def cmd_endpoint_delete(args: argparse.Namespace) -> int:
    data = _client(args).request("DELETE", f"/api/v1/endpoints/{args.name}")
    return _emit(args, data, lambda d: print(f"deleted endpoint {d['id']}"))


def cmd_endpoint_events(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", f"/api/v1/endpoints/{args.name}/events", query={"limit": args.limit})
    return _emit(args, data, lambda d: _print_table([[e["time"], e["kind"], e["message"]] for e in d["data"]], ["TIME", "KIND", "MESSAGE"]))


def cmd_endpoint_replicas(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", f"/api/v1/endpoints/{args.name}/replicas")

    def human(d: dict[str, Any]) -> None:
        rows = [
            [r["id"], r["state"], str(r["pid"] or "-"), str(r["port"] or "-"), _gpu_list(r), str(r["restarts"]),
             str(r["consecutive_failures"]), r["last_probe_result"] or "-", r["last_error"] or "-"]
            for r in d["data"]
        ]
        if not rows:
            print(f"endpoint {args.name} has no replicas")
            return
        _print_table(rows, ["REPLICA", "STATE", "PID", "PORT", "GPUS", "RESTARTS", "FAILS", "LAST PROBE", "LAST ERROR"])

    return _emit(args, data, human)


def _gpu_list(replica: dict[str, Any]) -> str:
    if not replica["gpus"]:
        return "-"
    text = ",".join(u[:12] for u in replica["gpus"])
    return f"{text} ({replica['gpu_share']:g})" if replica["gpu_share"] else text


def cmd_endpoint_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    rid = args.replica
    if rid is None:
        reps = client.request("GET", f"/api/v1/endpoints/{args.name}/replicas")["data"]
        if not reps:
            raise ApplianceError(f"endpoint {args.name} has no replicas", code="no_replicas")
        rid = reps[0]["id"]
        if len(reps) > 1:
            print(f"(replica {rid}; others: {', '.join(r['id'] for r in reps[1:])}; choose with --replica)", file=sys.stderr)
    path = f"/api/v1/endpoints/{args.name}/replicas/{rid}/logs"
    query = {"tail": args.tail, "follow": 1 if args.follow else None}
    for line in client.lines(path, query):
        print(line, flush=True)
    return 0


def cmd_endpoint_retry(args: argparse.Namespace) -> int:
    ep = _client(args).request("POST", f"/api/v1/endpoints/{args.name}/retry")
    return _emit(args, ep, lambda e: print(f"endpoint {e['name']}: error cleared, retrying ({e['status']})"))


def cmd_gpu_list(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/api/v1/gpus")

    def human(d: dict[str, Any]) -> None:
        if not d["available"]:
            print(d["reason"])
            return
        rows = [
            [str(g["index"]), g["uuid"], g["name"], f"{g['memory_used'] >> 20}/{g['memory_total'] >> 20} MiB",
             f"{g['utilization_gpu']}%" if g["utilization_gpu"] is not None else "-", g["mig_mode"], "yes" if g["allowed"] else "no",
             ", ".join(h["replica"] + (f" ({h['share']:g})" if h["share"] else "") for h in g["held_by"]) or "-"]
            for g in d["data"]
        ]
        _print_table(rows, ["IDX", "UUID", "NAME", "MEMORY", "UTIL", "MIG", "ALLOWED", "HELD BY"])

    return _emit(args, data, human)


# --- parser -------------------------------------------------------------------------------------


# --- keys, tokens, service accounts, usage, TLS --------------------------------------------------


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _expiry_fields(text: str | None, at: str, within: str) -> dict[str, Any]:
    from appliance.timefmt import is_duration

    if text is None:
        return {}
    if text.lower() == "never":
        return {at: None}
    return {within: text} if is_duration(text) else {at: text}


def _key_fields(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.scopes is not None:
        body["scopes"] = _csv(args.scopes)
    if args.endpoints is not None:
        body["endpoints"] = None if args.endpoints == "all" else _csv(args.endpoints)
    body.update(_expiry_fields(args.expires, "expires_at", "expires_in"))
    for flag, field in (("rpm", "rpm_limit"), ("tpm", "tpm_limit"), ("parallel", "max_parallel_requests")):
        value = getattr(args, flag)
        if value is not None:
            body[field] = None if value == 0 else value
    if args.meta:
        body["metadata"] = _kv(args.meta, "--meta")
    return body


def _key_table(keys: list[dict[str, Any]]) -> None:
    if not keys:
        print("no keys")
        return
    rows = [
        [k["id"], k["name"], k["prefix"] + "…", k["status"], ",".join(k["scopes"]), ",".join(k["endpoints"] or ["all"]),
         k["expires_at"] or "never", k["last_used_at"] or "-",
         "/".join(str(k[f] or "-") for f in ("rpm_limit", "tpm_limit", "max_parallel_requests"))]
        for k in keys
    ]
    _print_table(rows, ["ID", "NAME", "PREFIX", "STATUS", "SCOPES", "ENDPOINTS", "EXPIRES", "LAST USED", "RPM/TPM/PAR"])


def cmd_key_create(args: argparse.Namespace) -> int:
    body = _key_fields(args)
    body.setdefault("name", "key")
    key = _client(args).request("POST", "/api/v1/keys", body)
    return _emit(args, key, lambda k: print(f"{k['key']}\n(key {k['id']}, scopes {','.join(k['scopes'])}; shown once: store it now)"))


def cmd_key_update(args: argparse.Namespace) -> int:
    body = _key_fields(args)
    if not body:
        raise ApplianceError("nothing to change: give flags such as --rpm, --expires or --endpoints", code="usage")
    key = _client(args).request("PATCH", f"/api/v1/keys/{args.id}", body)
    return _emit(args, key, lambda k: _key_table([k]))


def cmd_key_list(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/api/v1/keys", query={"status": None if args.all else "active"})
    return _emit(args, data, lambda d: _key_table(d["data"]))


def cmd_key_show(args: argparse.Namespace) -> int:
    return _emit(args, _client(args).request("GET", f"/api/v1/keys/{args.id}"), lambda k: _key_table([k]))


def cmd_key_revoke(args: argparse.Namespace) -> int:
    data = _client(args).request("DELETE", f"/api/v1/keys/{args.id}", query={"force": "true" if args.force else None})
    return _emit(args, data, lambda d: print(f"revoked {d['id']}"))


def cmd_token_create(args: argparse.Namespace) -> int:
    if (args.duration is None) == (args.valid_until is None):
        raise ApplianceError("give --duration (e.g. 7d) or --valid-until (e.g. 2027-01-01)", code="usage")
    body: dict[str, Any] = {"duration": args.duration} if args.duration else {"valid_until": args.valid_until}
    if args.token_name:
        body["name"] = args.token_name
    tok = _client(args).request("POST", f"/api/v1/endpoints/{args.name}/tokens", body)
    return _emit(args, tok, lambda t: print(f"{t['token']}\n(token {t['id']} for endpoint {args.name}, valid until {t['expires_at']}; shown once)"))


def cmd_token_list(args: argparse.Namespace) -> int:
    return _emit(args, _client(args).request("GET", f"/api/v1/endpoints/{args.name}/tokens"), lambda d: _key_table(d["data"]))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    data = _client(args).request("DELETE", f"/api/v1/endpoints/{args.name}/tokens/{args.id}")
    return _emit(args, data, lambda d: print(f"revoked {d['id']}"))


def _account_table(accounts: list[dict[str, Any]]) -> None:
    rows = [[a["id"], a["name"], a["role"], a["client_id"], "disabled" if a["disabled"] else "active", a["last_token_at"] or "-"] for a in accounts]
    _print_table(rows, ["ID", "NAME", "ROLE", "CLIENT ID", "STATUS", "LAST TOKEN"]) if rows else print("no service accounts")


def _print_credentials(a: dict[str, Any]) -> None:
    print(f"client_id:     {a['client_id']}\nclient_secret: {a['client_secret']}\n(service account {a['id']}, role {a['role']}; "
          f"the secret is shown once)\ntoken: curl -u {a['client_id']}:{a['client_secret']} -d grant_type=client_credentials URL/oauth/token")


def cmd_account_create(args: argparse.Namespace) -> int:
    data = _client(args).request("POST", "/api/v1/service-accounts", {"name": args.name, "role": args.role})
    return _emit(args, data, _print_credentials)


def cmd_account_list(args: argparse.Namespace) -> int:
    return _emit(args, _client(args).request("GET", "/api/v1/service-accounts"), lambda d: _account_table(d["data"]))


def cmd_account_set(args: argparse.Namespace) -> int:
    body = {"disabled": args.action == "disable"}
    return _emit(args, _client(args).request("PATCH", f"/api/v1/service-accounts/{args.id}", body), lambda a: _account_table([a]))


def cmd_account_secret(args: argparse.Namespace) -> int:
    return _emit(args, _client(args).request("POST", f"/api/v1/service-accounts/{args.id}/secret"), _print_credentials)


def cmd_account_delete(args: argparse.Namespace) -> int:
    data = _client(args).request("DELETE", f"/api/v1/service-accounts/{args.id}")
    return _emit(args, data, lambda d: print(f"deleted {d['id']}"))


def cmd_oauth_rotate(args: argparse.Namespace) -> int:
    return _emit(args, _client(args).request("POST", "/api/v1/oauth/rotate-key"), lambda d: print(d["detail"]))


def cmd_usage(args: argparse.Namespace) -> int:
    query = {"key": args.key, "endpoint": args.endpoint, "since": args.since, "until": args.until}
    data = _client(args).request("GET", "/api/v1/usage", query=query)

    def human(d: dict[str, Any]) -> None:
        rows = [[u["hour"], u["key_name"] or u["key_id"] or "(public)", u["endpoint"], str(u["requests"]), str(u["prompt_tokens"]),
                 str(u["completion_tokens"]), str(u["errors"])] for u in d["data"]]
        t = d["totals"]
        rows.append(["total", "", "", str(t["requests"]), str(t["prompt_tokens"]), str(t["completion_tokens"]), str(t["errors"])])
        _print_table(rows, ["HOUR (UTC)", "KEY", "ENDPOINT", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "ERRORS"])

    return _emit(args, data, human)


def cmd_tls_init(args: argparse.Namespace) -> int:
    from appliance.tls import host_names, write_self_signed

    config = _config(args)
    cert = config.server.tls_cert or config.server.state_dir / "tls" / "cert.pem"
    key = config.server.tls_key or config.server.state_dir / "tls" / "key.pem"
    if (cert.exists() or key.exists()) and not args.force:
        raise ApplianceError(f"{cert} or {key} exists; --force replaces them", code="usage")
    names = list(dict.fromkeys(args.name or [])) + [n for n in host_names() if n not in (args.name or [])]
    write_self_signed(cert, key, names, days=args.days)
    print(f"wrote {cert} and {key} (0600), valid {args.days} days for: {', '.join(names)}")
    if config.server.tls_cert is None:
        print(f"add to [server] in the config file, then restart:\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"")
    print(f"clients trust it with: curl --cacert {cert} …  or  openai.OpenAI(http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=\"{cert}\")), …)")
    return 0


def _key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name")
    p.add_argument("--scopes", help="comma-separated: inference (default), read, admin")
    p.add_argument("--endpoints", help="comma-separated endpoint names this key may call (default: all; 'all' resets)")
    p.add_argument("--expires", help="30d, 12h, … from now, a date such as 2027-01-01, or never")
    p.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    p.add_argument("--tpm", type=int, help="tokens per minute (0: no limit)")
    p.add_argument("--parallel", type=int, help="requests in flight at once (0: no limit)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata (repeatable)")


def _access_commands(sub: Any, common: argparse.ArgumentParser, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("key", help="API keys")
    k = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = k.add_parser("create", parents=[client], help="create a key (printed once)")
    _key_flags(c)
    c.set_defaults(func=cmd_key_create)
    u = k.add_parser("update", parents=[client], help="change a key's scopes, endpoints, expiry or limits")
    u.add_argument("id")
    _key_flags(u)
    u.set_defaults(func=cmd_key_update)
    q = k.add_parser("list", parents=[client], help="active keys (--all: also expired and revoked)")
    q.add_argument("--all", action="store_true")
    q.set_defaults(func=cmd_key_list)
    q = k.add_parser("show", parents=[client], help="one key")
    q.add_argument("id")
    q.set_defaults(func=cmd_key_show)
    q = k.add_parser("revoke", parents=[client], help="revoke a key at once")
    q.add_argument("id")
    q.add_argument("--force", action="store_true", help="even the last admin key")
    q.set_defaults(func=cmd_key_revoke)

    p = sub.add_parser("service-account", help="service accounts for OAuth2 client credentials")
    a = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = a.add_parser("create", parents=[client], help="create one; prints client_id and client_secret once")
    q.add_argument("name")
    q.add_argument("--role", choices=["viewer", "user", "admin"], required=True)
    q.set_defaults(func=cmd_account_create)
    a.add_parser("list", parents=[client], help="list service accounts").set_defaults(func=cmd_account_list)
    for action, func, text in (
        ("disable", cmd_account_set, "refuse its tokens at once"),
        ("enable", cmd_account_set, "accept it again"),
        ("new-secret", cmd_account_secret, "issue a new client secret"),
        ("delete", cmd_account_delete, "delete it"),
    ):
        q = a.add_parser(action, parents=[client], help=text)
        q.add_argument("id")
        q.set_defaults(func=func)

    p = sub.add_parser("oauth", help="OAuth2 access tokens")
    o = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    o.add_parser("rotate-key", parents=[client], help="new signing key: every access token issued so far stops working").set_defaults(
        func=cmd_oauth_rotate)

    p = sub.add_parser("usage", parents=[client], help="requests and tokens per key, endpoint and hour")
    p.add_argument("--key", help="a key, token or service-account id")
    p.add_argument("--endpoint")
    p.add_argument("--since", default="24h", help="24h (ago, default), 7d, or an ISO date/time")
    p.add_argument("--until", help="an ISO date/time")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("tls", help="HTTPS")
    t = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = t.add_parser("init", parents=[common], help="write a self-signed certificate for this host's names and addresses")
    q.add_argument("--name", action="append", help="an extra host name or IP for the certificate (repeatable; the first is its CN)")
    q.add_argument("--days", type=int, default=825)
    q.add_argument("--force", action="store_true", help="replace existing files")
    q.set_defaults(func=cmd_tls_init)


def _token_commands(ep: Any, client: argparse.ArgumentParser) -> None:
    p = ep.add_parser("token", help="tokens valid for one endpoint until a set time")
    t = p.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    q = t.add_parser("create", parents=[client], help="generate a token (printed once)")
    q.add_argument("name", help="endpoint")
    q.add_argument("--duration", help="e.g. 7d, 12h")
    q.add_argument("--valid-until", help="e.g. 2027-01-01")
    q.add_argument("--token-name", help="a label")
    q.set_defaults(func=cmd_token_create)
    q = t.add_parser("list", parents=[client], help="the endpoint's tokens")
    q.add_argument("name", help="endpoint")
    q.set_defaults(func=cmd_token_list)
    q = t.add_parser("revoke", parents=[client], help="revoke a token")
    q.add_argument("name", help="endpoint")
    q.add_argument("id")
    q.set_defaults(func=cmd_token_revoke)


def _endpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", help="TOML file with endpoint fields (as in a [[endpoints]] entry)")
    p.add_argument("--model-folder", help="model folder on this box")
    p.add_argument("--runtime", choices=["custom", "vllm", "transformers", "sglang"])
    p.add_argument("--definition-file", help="model definition file name in the folder")
    p.add_argument("--served-model-name")
    p.add_argument("--alias", action="append", help="another model name for this endpoint (repeatable)")
    p.add_argument("--replicas", type=int)
    p.add_argument("--min-replicas", type=int)
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--max-surge", type=int, help="rolling update: replicas started above the desired count at a time (0: drain first)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS", help="a leaving replica gets this long to finish its requests")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="scale to zero after this long without a request (min replicas 0)")
    p.add_argument("--wake-timeout", type=float, metavar="SECONDS", help="longest a request waits for a scaled-to-zero endpoint to start")
    p.add_argument("--gpus", type=int, help="whole GPUs per replica")
    p.add_argument("--gpu-share", type=float, help="fraction of one GPU per replica (0 < f < 1)")
    p.add_argument("--cpu", type=float)
    p.add_argument("--mem", help="e.g. 8gb")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="worker environment (repeatable)")
    p.add_argument("--secret-env", action="append", metavar="KEY=VALUE", help="worker environment encrypted at rest and masked (repeatable)")
    p.add_argument("--extra-arg", action="append", metavar="ARG", help="appended to the start command (repeatable; use --extra-arg=--flag)")
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--public", action=argparse.BooleanOptionalAction, default=None, help="open without a key (--no-public: private)")
    p.add_argument("--description")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help=f"config file (default ${CONFIG_ENV} or {default_config_path()})")
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--url", help="admin API URL (default: from the running server's state_dir/server.json)")
    client.add_argument("--key-file", help="admin key file (default: state_dir/admin.key)")
    client.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = argparse.ArgumentParser(prog="appliance", description="Single-node model-serving appliance.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the appliance")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", parents=[common], help="validate a config file and print every problem")
    p.add_argument("path", nargs="?")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("demo-model", help="write a tiny random-weight model folder (needs the transformers extra)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing folder")
    p.set_defaults(func=cmd_demo_model)
    p = sub.add_parser("demo", help="serve the tiny demo model on CPU from a fresh state dir")
    p.add_argument("--state-dir", default="demo-state")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("admin-key", help="admin key recovery")
    ak = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = ak.add_parser("reset", parents=[common], help="revoke the bootstrap admin key and write a new one (works offline)")
    r.set_defaults(func=cmd_admin_key_reset)

    p = sub.add_parser("endpoint", help="manage endpoints on the running server")
    ep = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = ep.add_parser("create", parents=[client], help="create an endpoint")
    c.add_argument("name", nargs="?")
    _endpoint_flags(c)
    c.set_defaults(func=cmd_endpoint_create)
    u = ep.add_parser("update", parents=[client], help="change an endpoint")
    u.add_argument("name")
    _endpoint_flags(u)
    u.set_defaults(func=cmd_endpoint_update)
    ep.add_parser("list", parents=[client], help="list endpoints").set_defaults(func=cmd_endpoint_list)
    for action, func, text in (
        ("show", cmd_endpoint_show, "show an endpoint"),
        ("delete", cmd_endpoint_delete, "delete an endpoint"),
        ("replicas", cmd_endpoint_replicas, "an endpoint's replicas: state, pid, port, GPUs, probes"),
        ("retry", cmd_endpoint_retry, "clear the endpoint's error and restart failed replicas now"),
    ):
        q = ep.add_parser(action, parents=[client], help=text)
        q.add_argument("name")
        q.set_defaults(func=func)
    q = ep.add_parser("logs", parents=[client], help="a replica's log")
    q.add_argument("name")
    q.add_argument("--replica", help="replica id (default: the first listed)")
    q.add_argument("--tail", type=int, default=100, help="lines from the end (default 100)")
    q.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    q.set_defaults(func=cmd_endpoint_logs)
    e = ep.add_parser("events", parents=[client], help="an endpoint's audit events, newest first")
    e.add_argument("name")
    e.add_argument("--limit", type=int, default=50)
    e.set_defaults(func=cmd_endpoint_events)
    _token_commands(ep, client)
    from appliance.cli_autoscale import autoscale_commands  # here: it uses this module's helpers

    autoscale_commands(ep, client)
    _access_commands(sub, common, client)
    p = sub.add_parser("gpu", help="GPUs on this box")
    g = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g.add_parser("list", parents=[client], help="GPUs seen through NVML and which replicas hold them").set_defaults(func=cmd_gpu_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ApplianceError as exc:
        if len(exc.problems) > 1:
            print(f"error: {len(exc.problems)} problems:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "usage" else 1
    except KeyboardInterrupt:
        return 130
