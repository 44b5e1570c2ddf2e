"""The appliance's session-affinity and prefix routing as a Ray Serve request router: a request's key
picks its replica by the same rendezvous hash as on one box (domain/routing.py), so a conversation
stays on the engine that holds its KV cache while that replica lives, and only its keys move when it
goes. With no key (or for least_outstanding), Serve's own choice of the less busy of two replicas.

Serve routes before the body is read, so the key comes from the request's headers:
`X-Appliance-Route-Key` (what the appliance's gateway in front computes: the session, or the prompt's
prefix), else `X-Session-ID` as clients send it. Serve's exported config names this class with the
endpoint's routing settings as `request_router_kwargs`."""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from appliance.domain.routing import rendezvous_order

KEY_HEADERS = (b"x-appliance-route-key", b"x-session-id")


class ApplianceRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, routing: str = "least_outstanding", overload_factor: float = 2.0, **_: Any) -> None:
        self.routing = routing
        self.overload_factor = overload_factor

    async def choose_replicas(self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = route_key(pending_request.args) if pending_request is not None and self.routing != "least_outstanding" else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        queues = {i: self._replica_queue_len_cache.get(r.replica_id) for i, r in by_id.items()}
        ranks = rank(self.routing, list(by_id), key, queues, self.overload_factor, random)
        return [[by_id[i] for i in group] for group in ranks]


def rank(routing: str, ids: Sequence[str], key: str | None, queues: Mapping[str, int | None], overload_factor: float,
         rng: random.Random | Any) -> list[list[str]]:
    """Replica ids in the order Serve should try them (each group probed, the least busy of it taken).
    Keyed: the hash's first choice alone, then the rest in hash order, so a full replica gives its
    keys to the next one, always the same. Prefix routing leaves an overloaded first choice for the rest."""
    if not ids:
        return []
    if not key:
        return [rng.sample(list(ids), min(2, len(ids)))]  # Serve's power of two choices
    order = rendezvous_order(ids, key)
    if routing == "prefix":
        known = [q for q in queues.values() if q is not None]
        mine = queues.get(order[0])
        if mine is not None and known and mine > max(1, min(known)) * overload_factor:
            return [order[1:], order[:1]]
    return [[i] for i in order]


def route_key(args: Sequence[Any]) -> str | None:
    """The key among the request's headers; the proxy hands the replica the ASGI scope, pickled."""
    if not args:
        return None
    request = args[0]
    if isinstance(request, bytes):
        try:
            request = pickle.loads(request)  # noqa: S301 -- Serve's own proxy wrote it, in this cluster
        except Exception:  # noqa: BLE001 -- not an HTTP request (gRPC, a handle call): no key
            return None
    scope = getattr(request, "asgi_scope", None)
    if not isinstance(scope, dict):
        return None
    headers = dict(scope.get("headers") or ())
    for name in KEY_HEADERS:
        if headers.get(name):
            return bytes(headers[name]).decode("latin-1")
    return None
