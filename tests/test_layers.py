"""The package's layer rule and the absence of import cycles, read from every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"

# What each part of the package may import from the package (besides itself). Every import counts,
# those inside functions and under TYPE_CHECKING included.
BASE = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "domain": BASE,
    "config": BASE | {"domain"},
    "store": BASE | {"domain"},
    "security": BASE | {"domain", "config", "store"},
    "control": BASE | {"domain", "config", "store", "security"},
    "logs": set(),
    "api": BASE | {"domain", "config", "store", "security", "control", "logs", "__init__"},
    "service": BASE | {"config", "api"},
    "server": BASE | {"config", "security", "api", "logs", "service"},
    "cli": BASE | {"domain", "config", "store", "security", "control", "server", "demo_model", "logs", "__init__"},
    "demo_model": BASE,
    "__main__": {"cli"},
    "__init__": set(),
}
# Pure code does no I/O and no concurrency of its own.
IMPURE = {"asyncio", "aiohttp", "os", "shutil", "socket", "subprocess", "sqlite3", "sqlite_utils", "threading", "time", "psutil", "pynvml", "urllib"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (a `from pkg import mod` counts as pkg.mod when mod is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (PACKAGE.parent / Path(*sub.split("."))).is_dir():
                    found.add(sub)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part(module: str) -> str:
    """The layer of a module: its first name under appliance (appliance itself is __init__)."""
    return module.split(".")[1] if "." in module else "__init__"


def test_every_part_of_the_package_has_a_rule() -> None:
    assert {part(m) for m in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layer_rule(module: str) -> None:
    mine = part(module)
    wrong = sorted(
        m for m in imports(MODULES[module]) if m.startswith("appliance") and part(m) != mine and part(m) not in ALLOWED[mine]
    )
    assert not wrong, f"{module} ({mine}) may not import {wrong}: allowed are {sorted(ALLOWED[mine])}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if part(m) == "domain"))
def test_domain_is_pure(module: str) -> None:
    wrong = sorted(m for m in imports(MODULES[module]) if m.split(".")[0] in IMPURE)
    assert not wrong, f"{module} is pure code but imports {wrong}"


def test_no_import_cycles() -> None:
    graph = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # A package's __init__ is imported on the way to its modules; that is not a dependency on them.
    for m in graph:
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


# Rooms of control/: what each may import from the others (besides itself). endpoints and telemetry
# sit at control/'s top; every other control module lives in one of the rooms.
CONTROL_ALLOWED: dict[str, set[str]] = {
    "host": set(),
    "models": set(),
    "supervision": {"host", "models", "telemetry"},
    "scaling": {"supervision", "telemetry"},
    "ops": {"host", "endpoints"},
    "ray": {"host", "models", "scaling", "supervision"},
    "endpoints": {"host", "models"},
    "telemetry": set(),
    "__init__": set(),
}


def room(module: str) -> str:
    """A control module's room: its name under appliance.control (control's own __init__ is __init__)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def test_every_control_module_is_in_a_room() -> None:
    control = [m for m in MODULES if part(m) == "control"]
    assert {room(m) for m in control} <= set(CONTROL_ALLOWED), "a room of control/ with no rule"
    loose = [m for m in control if m.count(".") == 2 and MODULES[m].name != "__init__.py" and room(m) not in ("endpoints", "telemetry")]
    assert not loose, f"put these in a room of control/ (host, models, supervision, scaling, ops): {loose}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if part(m) == "control"))
def test_control_rooms_follow_their_rule(module: str) -> None:
    mine = room(module)
    wrong = sorted(
        m for m in imports(MODULES[module])
        if part(m) == "control" and m != "appliance.control" and room(m) != mine and room(m) not in CONTROL_ALLOWED[mine]
    )
    assert not wrong, f"{module} ({mine}) may not import {wrong}: allowed are {sorted(CONTROL_ALLOWED[mine])}"


def test_no_module_is_over_400_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules (one responsibility each): {long}"
