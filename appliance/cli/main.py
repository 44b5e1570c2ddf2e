"""The `appliance` command: the top-level parser, dispatch to the chosen command, and exit codes.

Server-side commands run here; the others talk to the running server's admin API with the admin key file.
Each command group lives in its own module and adds its subcommands through a `register` function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from appliance import __version__
from appliance.cli import access, autoscale, endpoint, export, gpu, model, server_side, tls, validate
from appliance.cli.options import shared_options
from appliance.errors import ApplianceError


def build_parser() -> argparse.ArgumentParser:
    shared = shared_options()
    parser = argparse.ArgumentParser(prog="appliance", description="Single-node model-serving appliance.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    # Also before the command (`appliance --config X endpoint list`); a subcommand's own --config wins.
    parser.add_argument("--config", "-c", dest="global_config", metavar="CONFIG", help="config file, for any command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order of registration is the order in which --help lists the commands.
    server_side.register(sub, shared)
    endpoint_actions = endpoint.register(sub, shared)
    access.register_tokens(endpoint_actions, shared)
    autoscale.register(endpoint_actions, shared)
    validate.register(endpoint_actions, shared)
    model.register(sub, shared)
    access.register(sub, shared)
    tls.register(sub, shared)
    gpu.register(sub, shared)
    export.register(sub, shared)
    for group in _groups(parser):
        # `appliance endpoint --config X list` too; SUPPRESS: absent, it leaves the other places' value alone
        group.add_argument("--config", "-c", dest="group_config", metavar="CONFIG", default=argparse.SUPPRESS, help="config file")
    return parser


def _groups(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command group below `parser` (a parser with actions of its own), at any depth."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    found.append(child)
                found += _groups(child)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is None:  # the command's own --config, else its group's, else the global one
        given = getattr(args, "group_config", None) or args.global_config
        if given is not None:
            args.config = given
    try:
        return int(args.func(args))
    except ApplianceError as exc:
        if len(exc.problems) > 1:
            print(f"error: {len(exc.problems)} problems:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "usage" else 1  # 2, like argparse's own usage errors
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `appliance … | head`: the reader has what it wanted
        sys.stdout = None  # type: ignore[assignment]  # nothing more to flush at exit
        return 0
