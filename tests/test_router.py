"""Pick policies as pure code."""

from __future__ import annotations

import random
from collections import Counter

from appliance.domain.routing import RoutableReplica, by_hash, least_outstanding, pick, prefix_key


def reps(n: int) -> list[RoutableReplica]:
    return [RoutableReplica(f"r{i}", "e", f"http://127.0.0.1:{9000 + i}", "m") for i in range(n)]


def test_least_outstanding_takes_the_least_loaded_and_spreads_ties() -> None:
    rng = random.Random(7)
    four = reps(4)
    assert least_outstanding(four, {"r0": 3, "r1": 1, "r2": 2, "r3": 5}, rng).id == "r1"
    spread = Counter(least_outstanding(four, {}, rng).id for _ in range(2000))
    assert set(spread) == {"r0", "r1", "r2", "r3"} and min(spread.values()) > 300


def test_affinity_is_stable_and_moves_only_the_keys_of_a_lost_replica() -> None:
    four = reps(4)
    keys = [f"user-{i}" for i in range(500)]
    before = {k: by_hash(four, k).id for k in keys}
    assert before == {k: by_hash(list(reversed(four)), k).id for k in keys}  # order does not matter
    three = [r for r in four if r.id != "r2"]
    after = {k: by_hash(three, k).id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r2" for k in moved) and len(moved) == sum(v == "r2" for v in before.values())


def test_session_affinity_falls_back_without_a_key() -> None:
    rng = random.Random(1)
    two = reps(2)
    assert pick("session_affinity", two, {"r0": 5, "r1": 0}, key=None, overload_factor=2, rng=rng).id == "r1"
    key_owner = by_hash(two, "alice").id
    assert pick("session_affinity", two, {key_owner: 100}, key="alice", overload_factor=2, rng=rng).id == key_owner


def test_prefix_sticks_until_the_cached_replica_is_overloaded() -> None:
    rng = random.Random(1)
    three = reps(3)
    owner = by_hash(three, "You are a helpful assistant").id
    calm = {r.id: 2 for r in three}
    assert pick("prefix", three, calm, key="You are a helpful assistant", overload_factor=2, rng=rng).id == owner
    hot = {**calm, owner: 5}  # more than 2 × the least load (2)
    assert pick("prefix", three, hot, key="You are a helpful assistant", overload_factor=2, rng=rng).id != owner


def test_prefix_key_from_prompt_or_messages() -> None:
    assert prefix_key({"prompt": "abcdef"}, 3) == "abc"
    msgs = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert prefix_key(msgs, 100) == "system:be brief\nuser:hi" and prefix_key(msgs, 6) == "system"
    assert prefix_key({"input": "x"}, 10) is None


def test_usage_is_read_from_answers_and_stream_tails() -> None:
    from appliance.api.inference.proxy import Outcome, usage_from_body, usage_from_sse

    out = Outcome()
    usage_from_body(b'{"choices": [{"text": "a \\"usage\\": trap"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}', out)
    assert (out.prompt_tokens, out.completion_tokens) == (7, 3)
    none = Outcome()
    usage_from_body(b'{"choices": []}', none)
    usage_from_body(b'{"usage": null}', none)
    assert none.prompt_tokens is None
    stream = Outcome()
    usage_from_sse(b'data: {"choices": [], "usage": null}\n\ndata: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 9}}\n\ndata: [DONE]\n\n', stream)
    assert (stream.prompt_tokens, stream.completion_tokens) == (2, 9)
