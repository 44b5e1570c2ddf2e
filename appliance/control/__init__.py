"""The owners of mutable runtime state: supervisor, replicas, processes, autoscaler, signals, endpoints."""
