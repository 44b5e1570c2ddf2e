"""`appliance tls init`: a self-signed certificate for the server's HTTPS, written on this box."""

from __future__ import annotations

import argparse

from appliance.cli.options import SharedOptions, Subcommands, load_cli_config
from appliance.errors import ApplianceError


def cmd_tls_init(args: argparse.Namespace) -> int:
    # Imported on use: it loads the cryptography package, which `appliance --help` does not need.
    from appliance.security.tls import host_names, write_self_signed

    config = load_cli_config(args)
    cert = config.server.tls_cert or config.server.state_dir / "tls" / "cert.pem"
    key = config.server.tls_key or config.server.state_dir / "tls" / "key.pem"
    if (cert.exists() or key.exists()) and not args.force:
        raise ApplianceError(f"{cert} or {key} exists; --force replaces them", code="usage")
    # --name values first and in order (the first is the CN), then this host's own names not already given.
    names = list(dict.fromkeys(args.name or [])) + [n for n in host_names() if n not in (args.name or [])]
    write_self_signed(cert, key, names, days=args.days)
    print(f"wrote {cert} and {key} (0600), valid {args.days} days for: {', '.join(names)}")
    if config.server.tls_cert is None:
        print(f"add to [server] in the config file, then restart:\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"")
    print(f"clients trust it with: curl --cacert {cert} …  or  openai.OpenAI(http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=\"{cert}\")), …)")
    return 0


def register(sub: Subcommands, shared: SharedOptions) -> None:
    p = sub.add_parser("tls", help="HTTPS")
    t = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = t.add_parser("init", parents=[shared.config], help="write a self-signed certificate for this host's names and addresses")
    q.add_argument("--name", action="append", help="an extra host name or IP for the certificate (repeatable; the first is its CN)")
    q.add_argument("--days", type=int, default=825)
    q.add_argument("--force", action="store_true", help="replace existing files")
    q.set_defaults(func=cmd_tls_init)
