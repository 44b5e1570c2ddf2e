"""The one error type of appliance and its OpenAI-shaped JSON form.

Every failure a user can see — a bad config key, a broken model definition, an API
error — is an ApplianceError. HTTP handlers raise it; one middleware renders it as
``{"error": {"message", "type", "param", "code", "source"}}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

# OpenAI error `type` by HTTP status: clients switch on these strings.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable_error",
}


class ApplianceError(Exception):
    """A failure with a message for people and a code for programs.

    ``problems`` carries every individual problem when there are several (config
    validation reports all of them at once); ``message`` summarises them.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str = "invalid_request",
        param: str | None = None,
        type: str | None = None,
        problems: Sequence[str] = (),
        source: str = "appliance",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.problems = list(problems)
        self.source = source
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            "source": self.source,
        }
        if self.problems:
            body["problems"] = self.problems
        return {"error": body}

    def __str__(self) -> str:
        if len(self.problems) > 1:
            return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        return self.message


def format_loc(loc: Sequence[str | int], prefix: str = "") -> str:
    """('endpoints', 1, 'replicas') -> 'endpoints[1].replicas'; dotted keys are quoted."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = f'"{part}"' if ("." in part or " " in part) else part
            out += f".{text}" if out else text
    return out


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "greater_than_equal":
        return f"must be ≥ {_num(ctx.get('ge'))}"
    if kind == "greater_than":
        return f"must be > {_num(ctx.get('gt'))}"
    if kind == "less_than_equal":
        return f"must be ≤ {_num(ctx.get('le'))}"
    if kind == "less_than":
        return f"must be < {_num(ctx.get('lt'))}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer (got {_type_name(got)})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {_type_name(got)})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {_type_name(got)})"
    if kind == "string_type":
        return f"must be a string (got {_type_name(got)})"
    if kind == "list_type":
        return f"must be a list (got {_type_name(got)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a table/object (got {_type_name(got)})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {got!r})"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"must have at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"]


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _type_name(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _clean_loc(loc: Sequence[str | int]) -> list[str | int]:
    # Pydantic inserts union-member and validator tags into loc; they mean nothing to a user.
    return [p for p in loc if not (isinstance(p, str) and (p.startswith("function-") or p in {"str", "int", "float", "list[str]", "literal['all','none']", "list[union[int,str]]", "constrained-str"}))]


def validation_items(exc: ValidationError, prefix: str = "") -> list[tuple[list[str | int], str]]:
    """Each distinct problem of a pydantic ValidationError as (clean loc, 'key.path: message')."""
    items: list[tuple[list[str | int], str]] = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        text = format_loc(loc, prefix)
        line = f"{text}: {_message(err)}" if text else _message(err)
        if all(line != seen for _, seen in items):
            items.append((loc, line))
    return items


def validation_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    return [line for _, line in validation_items(exc, prefix)]


def validation_error(exc: ValidationError, *, what: str, prefix: str = "", status: int = 422) -> ApplianceError:
    problems = validation_problems(exc, prefix)
    first = exc.errors(include_url=False)[0]["loc"] if exc.errors() else ()
    summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems in {what}: " + "; ".join(problems)
    return ApplianceError(
        summary,
        status=status,
        code="validation_error",
        param=format_loc(_clean_loc(first)) or None,
        problems=problems,
    )
