"""Who may make a gRPC call, and to which endpoint: the same keys, endpoint tokens and OAuth2 access tokens
as HTTP, read from the call's metadata, and the appliance's refusals as gRPC status codes.

A call names its endpoint in `x-endpoint` metadata (a name or an alias), not in the message: one Triton
server holds many models, and the Server* calls name none.
"""

from __future__ import annotations

import grpc
from multidict import CIMultiDict, CIMultiDictProxy

from appliance.api.inference.callers import admit_caller, identify_caller
from appliance.api.services import Services
from appliance.domain.specs import EndpointConfig
from appliance.errors import ApplianceError
from appliance.security.auth import Principal

ENDPOINT_KEY = "x-endpoint"
ERROR_KEY = "x-appliance-error"  # trailing metadata of the appliance's own refusals: tells them from a worker's status
REQUEST_ID_KEY = "x-request-id"
SESSION_KEY = "x-session-id"
# Never passed on to a worker: the caller's credential and cookies, and the appliance's own routing key. The
# rest are gRPC's and HTTP/2's own, which the upstream channel writes itself.
NOT_FORWARDED = frozenset(("authorization", "cookie", ENDPOINT_KEY, "user-agent", "te", "content-type", "host", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"))

KSERVE = "/inference.GRPCInferenceService/"
# Calls that act on every caller's server, not one inference: the model repository (load, unload), shared
# memory (registering a region makes the worker read host memory), tracing and log settings.
_ADMIN_PREFIXES = ("Repository", "SystemSharedMemory", "CudaSharedMemory", "TraceSetting", "LogSettings")
STREAMING = frozenset((KSERVE + "ModelStreamInfer",))
_KNOWN = frozenset(KSERVE + m for m in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer", "ModelConfig",
    "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
))


def method_label(method: str) -> str:
    """The method as a metric label: KServe v2's by name, any other as `other` (clients choose those names)."""
    return method.rsplit("/", 1)[-1] if method in _KNOWN else "other"


def needs_admin(method: str) -> bool:
    return method.startswith(KSERVE) and method[len(KSERVE):].startswith(_ADMIN_PREFIXES)


def is_unary(method: str) -> bool:
    """KServe v2's calls are unary except ModelStreamInfer; an unknown service's are relayed as streams,
    which carry any cardinality on the wire."""
    return method.startswith(KSERVE) and method not in STREAMING


_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED, 502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The other way, for request records and usage, which count HTTP statuses.
_STATUSES = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def code_of(err: ApplianceError) -> grpc.StatusCode:
    return _CODES.get(err.status, grpc.StatusCode.INTERNAL)


def http_status(code: grpc.StatusCode) -> int:
    return _STATUSES.get(code, 500)


class CallOrigin:
    """A gRPC call as the authenticator reads a request: its credential as the Authorization header (no
    cookie: a browser session never reaches this port), its method as the path."""

    __slots__ = ("cookies", "headers", "method", "path", "remote")

    def __init__(self, metadata: dict[str, str], method: str, peer: str) -> None:
        headers: CIMultiDict[str] = CIMultiDict()
        if "authorization" in metadata:
            headers["Authorization"] = metadata["authorization"]
        self.headers = CIMultiDictProxy(headers)
        self.cookies: dict[str, str] = {}
        self.method = "GRPC"
        self.path = method
        self.remote = peer_address(peer)


def peer_address(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' or 'ipv6:[::1]:5000' → the address alone."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


async def authorize(services: Services, origin: CallOrigin, name: str | None) -> tuple[str, EndpointConfig, Principal | None]:
    """The endpoint a call goes to and who it runs as (None: anonymous, on a public endpoint). Without a
    valid credential an unknown endpoint is refused as a private one is: names are not probed."""
    principal, refusal = await identify_caller(services.auth, origin)
    table = services.supervisor.table
    endpoint = table.resolve(name) if name else None
    config = table.endpoints.get(endpoint) if endpoint else None

    def not_found() -> ApplianceError:
        if not name:
            return ApplianceError(f"name the endpoint in `{ENDPOINT_KEY}` metadata (an endpoint's name or alias)", status=404, code="endpoint_required")
        return ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found")

    admin_only = f"{origin.path} acts on the whole server (its model repository, shared memory or settings)" if needs_admin(origin.path) else None
    principal = admit_caller(services.auth, origin, principal, refusal, config, not_found, admin_only=admin_only)
    assert endpoint is not None and config is not None
    return endpoint, config, principal
