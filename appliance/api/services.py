"""What the HTTP handlers reach through the application: built once by make_app, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from appliance.config import Config
from appliance.control.endpoints import EndpointService
from appliance.control.host.gpus import GpuMonitor
from appliance.control.ops.jobs import Jobs
from appliance.control.supervision.load import Load
from appliance.control.supervision.supervisor import Supervisor
from appliance.domain.limits import RateLimiter
from appliance.security.auth import Authenticator
from appliance.security.usage import Accounting
from appliance.security.vault import Vault
from appliance.store import Clock, Store


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
    vault: Vault
    accounting: Accounting
    load: Load
    jobs: Jobs = field(default_factory=Jobs)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    readiness: Readiness = field(default_factory=Readiness)


SERVICES = web.AppKey("services", Services)
