"""Response bodies of the admin API, as models (so openapi.json describes exactly what is sent)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.specs import EndpointConfig
from appliance.states import EndpointStatus
from appliance.store.repos import EndpointRow


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class EndpointView(EndpointConfig):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    status: EndpointStatus
    status_message: str = ""
    source: Literal["api", "config"] = Field(description="config: declared in the config file and managed by it")
    generation: int = Field(description="bumped on every change of the effective config")
    created_at: str
    updated_at: str
    spec: dict[str, Any] = Field(description="the fields as the user stated them, before the folder's defaults")

    @classmethod
    def of(cls, row: EndpointRow) -> "EndpointView":
        keys = ("status", "status_message", "source", "generation", "created_at", "updated_at", "spec")
        return cls.model_validate({**row["config"], **{k: row[k] for k in keys}})


class EndpointList(View):
    object: Literal["list"] = "list"
    data: list[EndpointView]


class Deleted(View):
    id: str
    object: str
    deleted: bool = True


class EventView(View):
    id: int
    time: str
    endpoint: str | None
    kind: str
    message: str
    details: dict[str, Any]


class EventList(View):
    object: Literal["list"] = "list"
    data: list[EventView]
    has_more: bool = Field(description="older events exist: ask again with before=<last id>")


class ErrorBody(View):
    message: str
    type: str
    param: str | None
    code: str
    source: Literal["appliance", "worker"]
    problems: list[str] | None = None


class ErrorResponse(View):
    error: ErrorBody


class Health(View):
    status: Literal["ok", "starting", "failed"]
    detail: str = ""
