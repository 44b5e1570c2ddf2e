"""`appliance export ray-serve`: the config file's endpoints as a Ray Serve config, for `serve deploy`.
Offline: it reads the config and the model folders, never the running server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from appliance.cli.options import SharedOptions, Subcommands, load_cli_config
from appliance.control.endpoints import resolve
from appliance.control.ray.backend import RAY_INSTALL, validate
from appliance.domain.scaling import Rule, declared_rule_rows
from appliance.domain.serve_export import serve_config
from appliance.domain.specs import EndpointConfig
from appliance.errors import ApplianceError
from appliance.security.vault import Vault

def cmd_export_ray_serve(args: argparse.Namespace) -> int:
    config = load_cli_config(args)
    vault = Vault(config.secret_key_path)
    endpoints: list[EndpointConfig] = []
    rules: dict[str, list[Rule]] = {}
    skipped: list[str] = []
    for spec in config.endpoints:
        if spec.model is not None:
            skipped.append(f"endpoint {spec.name}: serves the registered model {spec.model!r}, which Ray's nodes cannot fetch: give its folder as model_folder")
            continue
        resolved, _ = resolve(spec)
        # Sealed as the store seals them: Serve's config (shown by its dashboard) never holds a secret in plain.
        sealed = {k: vault.seal(v) for k, v in resolved.secret_environ.items()}
        endpoints.append(resolved.model_copy(update={"secret_environ": sealed}))
        rules[spec.name] = [Rule.of(row) for row in declared_rule_rows(spec.name, spec.autoscaling_rules)]
    if not endpoints:
        raise ApplianceError("the config declares no endpoint to export ([[endpoints]] with a model_folder)", code="usage")
    document, warnings = serve_config(endpoints, host=args.host, port=args.port, rules=rules)
    checked = validate(document)
    text = yaml.safe_dump(document, sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    for w in skipped + warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not checked:
        print(f"note: not checked against Ray's ServeDeploySchema (Ray is not installed here: {RAY_INSTALL})", file=sys.stderr)
    if any(e.secret_environ for e in endpoints):
        print(f"note: secret environ values are sealed: give the nodes APPLIANCE_SECRET_KEY=$(cat {config.secret_key_path})", file=sys.stderr)
    return 0


def register(sub: Subcommands, shared: SharedOptions) -> None:
    p = sub.add_parser("export", help="the config's endpoints in another system's format")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="FORMAT")
    r = kinds.add_parser("ray-serve", parents=[shared.config], help="a Ray Serve config (serve deploy FILE); see docs/ray.md")
    r.add_argument("--host", default="127.0.0.1", help="where Serve's proxy listens (default 127.0.0.1: keep it private)")
    r.add_argument("--port", type=int, default=8000, help="Serve's proxy port (default 8000)")
    r.add_argument("--output", "-o", help="write the config here (default: standard output)")
    r.set_defaults(func=cmd_export_ray_serve)
