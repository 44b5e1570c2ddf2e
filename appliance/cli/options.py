"""The options command groups share, and what they resolve to.

--config (every command that reads the config file) and --url, --key-file, --json (every command that calls
the running server's admin API) are defined once here as parent parsers; `load_cli_config` and `admin_client`
read them back, so an option's name and the code that reads it stay in one place."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from appliance.config import CONFIG_ENV, Config, default_config_path, load_config
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.cli.client import AdminClient

# What add_subparsers() returns: argparse has no public name for it, and it is not subscriptable at run time.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@dataclass(frozen=True)
class SharedOptions:
    """Parent parsers, for add_parser(..., parents=[...])."""

    config: argparse.ArgumentParser  # --config
    client: argparse.ArgumentParser  # --config, --url, --key-file, --json


def shared_options() -> SharedOptions:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", "-c", help=f"config file (default ${CONFIG_ENV} or {default_config_path()})")
    client = argparse.ArgumentParser(add_help=False, parents=[config])
    client.add_argument("--url", help="admin API URL (default: from the running server's state_dir/server.json)")
    client.add_argument("--key-file", help="admin key file (default: state_dir/admin.key)")
    client.add_argument("--json", action="store_true", help="print JSON for scripts")
    return SharedOptions(config=config, client=client)


def load_cli_config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if getattr(args, "config", None) else default_config_path()
    if not path.exists():
        how = (f"--config {path} was given" if getattr(args, "config", None)
               else f"${CONFIG_ENV} names it" if os.environ.get(CONFIG_ENV) else "it is the default")
        raise ApplianceError(
            f"config file {path} does not exist ({how}). Pass --config FILE (before or after the command) or "
            f"export {CONFIG_ENV}=FILE; for the demo, `appliance demo` prints the line to export", code="usage",
        )
    return load_config(path)


def admin_client(args: argparse.Namespace) -> AdminClient:
    # Imported on use: the client pulls in the server and TLS modules, which `appliance --help` and the
    # commands that never call the admin API do not need.
    from appliance.cli.client import AdminClient

    return AdminClient.from_config(load_cli_config(args), url=args.url, key_file=Path(args.key_file) if args.key_file else None)


def parse_kv(pairs: Sequence[str], flag: str) -> dict[str, str]:
    """Values of a repeatable KEY=VALUE option; `flag` names it in the usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ApplianceError(f"{flag} takes KEY=VALUE (got {pair!r})", code="usage")
        out[key] = value
    return out
