"""The gRPC port: Triton and KServe v2 clients relayed to the endpoints' workers, with the gateway's keys and admission."""

import os

# Workers are started with fork and exec: nothing gRPC runs in a child, so grpc's fork handlers (which log a
# line on every worker start while its threads are busy) have nothing to protect.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
