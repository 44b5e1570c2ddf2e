"""Which replica serves a request: pure pick policies over an immutable routing table.

The supervisor publishes a RoutingTable on every change; the gateway reads the current one
and counts requests in flight per replica. Picks are pure functions of (candidates,
in-flight counts, key, random source) so they are tested without servers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from appliance.domain.specs import EndpointConfig


@dataclass(frozen=True)
class RoutableReplica:
    id: str
    endpoint: str
    url: str
    served_model_name: str
    grpc: str | None = None  # host:port of its worker's gRPC server, if it has one


@dataclass(frozen=True)
class RoutingTable:
    routable: Mapping[str, tuple[RoutableReplica, ...]] = field(default_factory=lambda: MappingProxyType({}))
    endpoints: Mapping[str, EndpointConfig] = field(default_factory=lambda: MappingProxyType({}))
    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # name or alias → endpoint
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))  # replicas by state
    statuses: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    desired: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # replicas wanted now
    # Endpoints whose serving capacity was taken away on purpose (a wake, a roll with no room for one
    # more replica) until a new replica is HEALTHY: requests wait for it as long as a start may take.
    awaiting: frozenset[str] = frozenset()
    blocked: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # endpoint → why nothing can be evicted for it

    def resolve(self, model: str) -> str | None:
        return self.names.get(model)


def _score(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


def least_outstanding(candidates: Sequence[RoutableReplica], inflight: Mapping[str, int], rng: random.Random) -> RoutableReplica:
    """Fewest requests in flight; a tie is broken at random, so equal replicas share the load evenly."""
    if len(candidates) == 1:
        return candidates[0]
    low = min(inflight.get(r.id, 0) for r in candidates)
    best = [r for r in candidates if inflight.get(r.id, 0) == low]
    return best[0] if len(best) == 1 else rng.choice(best)


def rendezvous_order(ids: Sequence[str], key: str) -> list[str]:
    """Replica ids by their rendezvous score for `key`, best first: by_hash's choice leads, and the next is
    where the key goes when that one cannot take it."""
    return sorted(ids, key=lambda i: _score(key, i), reverse=True)


def by_hash(candidates: Sequence[RoutableReplica], key: str) -> RoutableReplica:
    """Rendezvous hashing: a key stays on its replica while that replica is routable; when it goes,
    only its keys move."""
    return max(candidates, key=lambda r: _score(key, r.id))


def pick(
    policy: str,
    candidates: Sequence[RoutableReplica],
    inflight: Mapping[str, int],
    *,
    key: str | None,
    overload_factor: float,
    rng: random.Random,
) -> RoutableReplica:
    if not candidates:
        raise ValueError("no candidate replica")
    if policy == "session_affinity" and key:
        return by_hash(candidates, key)
    if policy == "prefix" and key:
        chosen = by_hash(candidates, key)
        low = min(inflight.get(r.id, 0) for r in candidates)
        # Shared prefixes stay on one engine's cache, unless that engine is overloaded.
        if inflight.get(chosen.id, 0) <= max(1, low) * overload_factor:
            return chosen
    return least_outstanding(candidates, inflight, rng)


def prefix_key(body: Mapping[str, object], length: int) -> str | None:
    """The leading `length` characters of the prompt or of the serialised messages."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:length]
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                parts.append(f"{m.get('role')}:{content if isinstance(content, str) else repr(content)}")
        return "\n".join(parts)[:length] or None
    return None
