"""What the HTTP handlers reach through the application: built once by make_app, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from appliance.auth import Authenticator
from appliance.config import Config
from appliance.endpoints import EndpointService
from appliance.gpu import GpuMonitor
from appliance.jobs import Jobs
from appliance.limits import RateLimiter
from appliance.load import Load
from appliance.store import Clock, Store
from appliance.supervisor import Supervisor
from appliance.usage import Accounting
from appliance.vault import Vault


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
