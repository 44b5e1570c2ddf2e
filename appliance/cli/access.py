"""Who may call the server, and what they did: `appliance key`, `endpoint token`, `service-account`, `oauth`
and `usage`, through the admin API."""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli.options import SharedOptions, Subcommands, admin_client, parse_kv
from appliance.cli.output import emit, print_table
from appliance.domain.timefmt import is_duration, parse_instant
from appliance.errors import ApplianceError


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _expiry_fields(text: str | None, at: str, within: str) -> dict[str, Any]:
    """--expires as the API takes it: a duration goes in `within`, a date in `at`, never clears `at`."""
    if text is None:
        return {}
    if text.lower() == "never":
        return {at: None}
    if is_duration(text):
        return {within: text}
    try:
        parse_instant(text, param="--expires")  # checked here so that a typo such as `30x` is told the forms that work
    except ApplianceError:
        raise ApplianceError(
            f"--expires: {text!r} is neither a duration nor a date: use e.g. 30d, 12h, 15m or 90s (from now), "
            "a date such as 2027-01-01 (or 2027-01-01T12:00:00Z), or never", code="usage",
        ) from None
    return {at: text}


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
            body[field] = None if value == 0 else value  # 0 on the command line: no limit
    if args.meta:
        body["metadata"] = parse_kv(args.meta, "--meta")
    return body


def _key_table(keys: list[dict[str, Any]]) -> None:
    """Keys and endpoint tokens alike: a token is a key limited to one endpoint."""
    if not keys:
        print("no keys")
        return
    rows = [
        [k["id"], k["name"], k["prefix"] + "…", k["status"], ",".join(k["scopes"]), ",".join(k["endpoints"] or ["all"]),
         k["expires_at"] or "never", k["last_used_at"] or "-",
         "/".join(str(k[f] or "-") for f in ("rpm_limit", "tpm_limit", "max_parallel_requests"))]
        for k in keys
    ]
    print_table(rows, ["ID", "NAME", "PREFIX", "STATUS", "SCOPES", "ENDPOINTS", "EXPIRES", "LAST USED", "RPM/TPM/PAR"])


def cmd_key_create(args: argparse.Namespace) -> int:
    body = _key_fields(args)
    body.setdefault("name", "key")
    key = admin_client(args).request("POST", "/api/v1/keys", body)
    return emit(args, key, lambda k: print(f"{k['key']}\n(key {k['id']}, scopes {','.join(k['scopes'])}; shown once: store it now)"))


def cmd_key_update(args: argparse.Namespace) -> int:
    body = _key_fields(args)
    if not body:
        raise ApplianceError("nothing to change: give flags such as --rpm, --expires or --endpoints", code="usage")
    key = admin_client(args).request("PATCH", f"/api/v1/keys/{args.id}", body)
    return emit(args, key, lambda k: _key_table([k]))


def cmd_key_list(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", "/api/v1/keys", query={"status": None if args.all else "active"})
    return emit(args, data, lambda d: _key_table(d["data"]))


def cmd_key_show(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("GET", f"/api/v1/keys/{args.id}"), lambda k: _key_table([k]))


def cmd_key_revoke(args: argparse.Namespace) -> int:
    data = admin_client(args).request("DELETE", f"/api/v1/keys/{args.id}", query={"force": "true" if args.force else None})
    return emit(args, data, lambda d: print(f"revoked {d['id']}"))


def cmd_token_create(args: argparse.Namespace) -> int:
    if args.duration is None and args.valid_until is None:
        raise ApplianceError("give --duration (e.g. 7d, 90m, 2mo, 1yr) or --valid-until (epoch seconds or e.g. 2027-01-01)", code="usage")
    # both may go: the server, like Backend.AI, lets valid_until win (and still checks the duration)
    body: dict[str, Any] = {k: v for k, v in (("valid_until", args.valid_until), ("duration", args.duration)) if v is not None}
    if args.token_name:
        body["name"] = args.token_name
    tok = admin_client(args).request("POST", f"/api/v1/endpoints/{args.name}/tokens", body)
    return emit(args, tok, lambda t: print(f"{t['token']}\n(token {t['id']} for endpoint {args.name}, valid until {t['expires_at']}; shown once)"))


def cmd_token_list(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("GET", f"/api/v1/endpoints/{args.name}/tokens"), lambda d: _key_table(d["data"]))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    data = admin_client(args).request("DELETE", f"/api/v1/endpoints/{args.name}/tokens/{args.id}")
    return emit(args, data, lambda d: print(f"revoked {d['id']}"))


def _account_table(accounts: list[dict[str, Any]]) -> None:
    rows = [[a["id"], a["name"], a["role"], a["client_id"], "disabled" if a["disabled"] else "active", a["last_token_at"] or "-"] for a in accounts]
    if rows:
        print_table(rows, ["ID", "NAME", "ROLE", "CLIENT ID", "STATUS", "LAST TOKEN"])
    else:
        print("no service accounts")


def _print_credentials(a: dict[str, Any]) -> None:
    print(f"client_id:     {a['client_id']}\nclient_secret: {a['client_secret']}\n(service account {a['id']}, role {a['role']}; "
          f"the secret is shown once)\ntoken: curl -u {a['client_id']}:{a['client_secret']} -d grant_type=client_credentials URL/oauth/token")


def cmd_account_create(args: argparse.Namespace) -> int:
    data = admin_client(args).request("POST", "/api/v1/service-accounts", {"name": args.name, "role": args.role})
    return emit(args, data, _print_credentials)


def cmd_account_list(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("GET", "/api/v1/service-accounts"), lambda d: _account_table(d["data"]))


def cmd_account_set(args: argparse.Namespace) -> int:
    body = {"disabled": args.action == "disable"}
    return emit(args, admin_client(args).request("PATCH", f"/api/v1/service-accounts/{args.id}", body), lambda a: _account_table([a]))


def cmd_account_secret(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("POST", f"/api/v1/service-accounts/{args.id}/secret"), _print_credentials)


def cmd_account_delete(args: argparse.Namespace) -> int:
    data = admin_client(args).request("DELETE", f"/api/v1/service-accounts/{args.id}")
    return emit(args, data, lambda d: print(f"deleted {d['id']}"))


def cmd_oauth_rotate(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("POST", "/api/v1/oauth/rotate-key"), lambda d: print(d["detail"]))


def cmd_usage(args: argparse.Namespace) -> int:
    query = {"key": args.key, "endpoint": args.endpoint, "since": args.since, "until": args.until}
    data = admin_client(args).request("GET", "/api/v1/usage", query=query)

    def human(d: dict[str, Any]) -> None:
        rows = [[u["hour"], u["key_name"] or u["key_id"] or "(public)", u["endpoint"], str(u["requests"]), str(u["prompt_tokens"]),
                 str(u["completion_tokens"]), str(u["errors"])] for u in d["data"]]
        t = d["totals"]
        rows.append(["total", "", "", str(t["requests"]), str(t["prompt_tokens"]), str(t["completion_tokens"]), str(t["errors"])])
        print_table(rows, ["HOUR (UTC)", "KEY", "ENDPOINT", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "ERRORS"])

    return emit(args, data, human)


def _key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name")
    p.add_argument("--scopes", help="comma-separated: inference (default), read, admin")
    p.add_argument("--endpoints", help="comma-separated endpoint names this key may call (default: all; 'all' resets)")
    p.add_argument("--expires", help="30d, 12h, … from now, a date such as 2027-01-01, or never")
    p.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    p.add_argument("--tpm", type=int, help="tokens per minute (0: no limit)")
    p.add_argument("--parallel", type=int, help="requests in flight at once (0: no limit)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata (repeatable)")


def register_tokens(endpoint_actions: Subcommands, shared: SharedOptions) -> None:
    """Add `endpoint token` to the actions endpoint.register returned."""
    p = endpoint_actions.add_parser("token", help="tokens valid for one endpoint until a set time")
    t = p.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    q = t.add_parser("create", parents=[shared.client], help="generate a token (printed once)")
    q.add_argument("name", help="endpoint")
    q.add_argument("--duration", help="from now, Backend.AI units: 3600 (seconds), 90m (minutes), 1.5h, 7d, 2w, 2mo, 1yr")
    q.add_argument("--valid-until", help="Unix epoch seconds (1767225600) or ISO 8601 (2027-01-01, 2027-01-01T09:00:00+09:00); "
                   "wins over --duration")
    q.add_argument("--token-name", help="a label")
    q.set_defaults(func=cmd_token_create)
    q = t.add_parser("list", parents=[shared.client], help="the endpoint's tokens")
    q.add_argument("name", help="endpoint")
    q.set_defaults(func=cmd_token_list)
    q = t.add_parser("revoke", parents=[shared.client], help="revoke a token")
    q.add_argument("name", help="endpoint")
    q.add_argument("id")
    q.set_defaults(func=cmd_token_revoke)


def register(sub: Subcommands, shared: SharedOptions) -> None:
    """Add `key`, `service-account`, `oauth` and `usage`."""
    client = shared.client
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
