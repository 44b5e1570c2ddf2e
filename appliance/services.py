"""What the HTTP handlers reach through the application: built once by make_app, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from appliance.auth import Authenticator
from appliance.config import Config
from appliance.endpoints import EndpointService
from appliance.gpu import GpuMonitor
from appliance.store import Clock, Store
from appliance.supervisor import Supervisor


@dataclass
class Readiness:
    ready: bool = False
    failure: str | None = None


@dataclass
class Services:
    config: Config
    clock: Clock
    store: Store
    endpoints: EndpointService
    auth: Authenticator
    gpus: GpuMonitor
    supervisor: Supervisor
    readiness: Readiness = field(default_factory=Readiness)


SERVICES = web.AppKey("services", Services)
