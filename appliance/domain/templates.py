"""Template variables in start commands and pre-start arguments, and where a Backend.AI
container's paths and port land on this box. Pure functions.

Backend.AI fills `{expr}` and `${{ expr }}` with Python's format_map over its variables
(`ports`, `runtime_path`, the `ref`s of pre-start actions; HEAD adds `{model_path}`), so
`{ports[0]}` and `{out[out]}` work. Braces that are not an expression, such as JSON in an
argument, are left as written here (Backend.AI would fail on them), and `${VAR}` is the
shell's. A name that is not defined is an error that names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.errors import ApplianceError

# Backend.AI's two styles: ${{ expr }} (GitHub style), or {expr} not preceded by $ or {.
_TEMPLATE = re.compile(r"\$\{\{\s*(?P<gh>.*?)\s*\}\}|(?<![${])\{\s*(?P<py>[^{}]*?)\s*\}")
# What format_map can evaluate: a name, then [index] or .attribute parts, then a conversion or a format spec.
_EXPR = re.compile(r"^[A-Za-z_]\w*(?:\[[^\[\]{}]*\]|\.[A-Za-z]\w*)*(?:![rsa])?(?::[^{}]*)?$")

# Backend.AI mounts the model folder here (its default model_mount_destination) and the
# working directory at /home/work.
MODEL_MOUNT = "/models"
WORK_MOUNT = "/home/work"


def render(text: str, variables: Mapping[str, Any], *, where: str) -> str:
    """Fill the template expressions in `text`; an undefined name is a 422 naming it and `where`."""

    def fill(m: re.Match[str]) -> str:
        expr = m.group("gh") if m.group("gh") is not None else m.group("py")
        if m.group("gh") is None and not _EXPR.match(expr):
            return m.group(0)  # JSON, a shell brace group …: not a template
        try:
            return ("{" + expr + "}").format_map(variables)
        except KeyError as exc:
            known = ", ".join(sorted(variables))
            raise ApplianceError(
                f"{where}: undefined template variable {exc.args[0]!r} in {m.group(0)!r} (defined: {known})",
                status=422, code="undefined_template_variable",
            ) from None
        except (IndexError, ValueError, AttributeError, TypeError) as exc:
            raise ApplianceError(f"{where}: cannot fill {m.group(0)!r}: {exc}", status=422, code="undefined_template_variable") from None

    return _TEMPLATE.sub(fill, text)


def render_all(parts: Sequence[str], variables: Mapping[str, Any], *, where: str) -> list[str]:
    return [render(p, variables, where=where) for p in parts]


def _mount_re(mount: str) -> re.Pattern[str]:
    # the mount as a path of its own: not inside /data/models, not /modelsx
    return re.compile(r"(?<![\w./-])" + re.escape(mount) + r"(?=/|$|[\s'\"`;:|&)=,])")


def map_paths(text: str, mounts: Mapping[str, str]) -> str:
    """Container paths (`/models/…`, `/home/work/…`) in an argument or a shell script, as paths on this box."""
    for mount, here in mounts.items():
        text = _mount_re(mount).sub(lambda _m, here=here: here.rstrip("/") or "/", text)
    return text


def map_port(text: str, ports: Mapping[int, int]) -> str:
    """The definition's fixed ports, wherever one stands as a number of its own (`8000`, `--port=8000`,
    `0.0.0.0:8000`), become the replica's: several replicas share this box's ports. One pass, so a
    replaced number is never replaced again."""
    numbers = "|".join(str(p) for p in ports)
    return re.sub(r"(?<![\w.])(" + numbers + r")(?![\w.])", lambda m: str(ports[int(m.group(1))]), text)


def resolve_model_path(model_path: str, folder: str, work_dir: str) -> str:
    """Where a definition's model_path is on this box: a subdirectory of /models is that
    subdirectory of the folder. Anything outside the two mounts cannot be found here."""
    mapped = map_paths(model_path, {MODEL_MOUNT: folder, WORK_MOUNT: work_dir})
    if mapped == model_path:
        raise ApplianceError(
            f"model_path {model_path!r} is outside {MODEL_MOUNT} (where Backend.AI mounts the model folder) and {WORK_MOUNT}",
            status=422, code="invalid_definition", param="model_path",
        )
    return mapped
