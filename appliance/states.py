"""Leaf enums shared by the store, the supervisor and the API. Imports nothing of appliance."""

from enum import StrEnum


class EndpointStatus(StrEnum):
    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    UNHEALTHY = "UNHEALTHY"
    ERROR = "ERROR"
    SCALED_TO_ZERO = "SCALED_TO_ZERO"


class ReplicaState(StrEnum):
    PROVISIONING = "PROVISIONING"
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"
