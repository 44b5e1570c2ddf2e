"""Response bodies of the admin API, as models (so openapi.json describes exactly what is sent)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.domain.specs import EndpointConfig, resting_replicas
from appliance.domain.states import EndpointStatus, ReplicaState
from appliance.security.vault import masked
from appliance.store.repos import EndpointRow


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class GpuBudget(View):
    index: int
    uuid: str
    memory_total: int
    budget: int = Field(description="memory_total less [gpus] memory_reserve: what replicas' claims may add up to")
    claimed: int = Field(description="bytes claimed by the replicas on it (the whole budget when one holds it whole)")


class EndpointView(EndpointConfig):
    # Stored rows are shown as they are: one written before numbers had to be finite must not make a 500.
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, allow_inf_nan=True)

    status: EndpointStatus
    status_message: str = ""
    source: Literal["api", "config"] = Field(description="config: declared in the config file and managed by it")
    generation: int = Field(description="bumped when a change needs new worker processes (replicas then roll)")
    created_at: str
    updated_at: str
    spec: dict[str, Any] = Field(description="the fields as the user stated them, before the folder's defaults")
    replica_counts: dict[str, int] = Field(default_factory=dict, description="replicas by state")
    desired_replicas: int = Field(description="replicas wanted now: set by autoscaling (and scale to zero), else `replicas`")
    gpu_memory_claim: int | None = Field(
        None, description="bytes of GPU memory one replica claims: resources.gpu_memory; else, on a GPU, at least memory_estimate + "
        "[gpus] claim_overhead (a gpu_share claims share × the GPU's budget when that is more: see each replica's gpu_memory); "
        "null: gpu_share × the budget, whole GPUs, or no GPU",
    )
    claim_source: Literal["stated", "estimate", "share", "whole", "none"] = Field(
        "none", description="where gpu_memory_claim comes from: resources.gpu_memory, the estimate, gpu_share, whole GPUs, or no GPU asked for"
    )
    gpu_budgets: list[GpuBudget] = Field(default_factory=list, description="GET of one endpoint: each usable GPU's budget and what is claimed on it")

    @classmethod
    def of(cls, row: EndpointRow, counts: dict[str, int] | None = None) -> EndpointView:
        keys = ("status", "status_message", "source", "generation", "created_at", "updated_at")
        return cls.model_validate(
            {**masked(row["config"]), **{k: row[k] for k in keys}, "spec": masked(row["spec"]), "replica_counts": counts or {},
             "desired_replicas": resting_replicas(row["config"]) if row.get("desired_replicas") is None else row["desired_replicas"]}
        )


class EndpointList(View):
    object: Literal["list"] = "list"
    has_more: bool = Field(False, description="more items follow: ask again with after=<the last item's name or id>")
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
    request_id: str | None = Field(None, description="X-Request-ID of the request, to find it in the appliance's log")


class ErrorResponse(View):
    error: ErrorBody


class Health(View):
    status: Literal["ok", "starting", "failed"]
    detail: str = ""


class ReplicaView(View):
    id: str
    endpoint: str
    generation: int
    state: ReplicaState
    pid: int | None
    cgroup: str | None = Field(None, description="the replica's cgroup v2 directory, when replicas are isolated by cgroups")
    port: int | None
    inflight: int = Field(0, description="requests and gRPC calls it is answering now")
    grpc_port: int | None = Field(None, description="its worker's gRPC port, when its definition declares one ([grpc] relays to it)")
    address: str | None = Field(None, description="where the gateway reaches it when not a port of this box: a Ray replica's route or its worker")
    gpus: list[str] = Field(description="UUIDs of the GPUs the replica is pinned to (CUDA_VISIBLE_DEVICES)")
    gpu_share: float | None
    gpu_memory: int | None = Field(None, description="bytes of GPU memory the replica claims on each of its GPUs (null: held whole, or none)")
    command: list[str]
    started_at: str | None
    restarts: int
    consecutive_failures: int = Field(description="failed health probes in a row (counted ones)")
    last_probe_at: str | None
    last_probe_result: str
    last_error: str
    work_dir: str
    log_path: str


class ReplicaList(View):
    object: Literal["list"] = "list"
    data: list[ReplicaView]


class GpuHolder(View):
    replica: str
    share: float | None = Field(description="null: the GPU is held whole, or shared by memory claim only")
    claim: int | None = Field(None, description="bytes of memory the replica claims on it; null: held whole")


class GpuView(View):
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    utilization_gpu: int | None
    utilization_memory: int | None
    mig_mode: str
    processes: list[dict[str, int | None]]
    allowed: bool = Field(description="listed in [gpus] devices")
    held_by: list[GpuHolder]
    budget: int = Field(0, description="memory_total less [gpus] memory_reserve: what replicas' claims may add up to")
    claimed: int = Field(0, description="bytes claimed by the replicas on it (the whole budget when one holds it whole)")


class GpuList(View):
    object: Literal["list"] = "list"
    available: bool
    reason: str = ""
    data: list[GpuView]


class RequestView(View):
    time: str
    endpoint: str
    replica: str | None
    key_id: str | None
    status: int
    latency: float = Field(description="seconds, to the last byte")
    ttfb: float | None = Field(description="seconds to the first byte from the worker")
    prompt_tokens: int | None
    completion_tokens: int | None
    streamed: bool
    error_source: str | None
    request_id: str = Field("", description="X-Request-ID of the request: the client's, or the one the appliance made")


class RequestList(View):
    object: Literal["list"] = "list"
    data: list[RequestView]
