"""Replica lifecycle: the supervisor's reconcile loop, each replica's runner and health checks, the GPU and port ledger, requests in flight, dry runs."""
