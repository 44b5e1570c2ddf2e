"""The appliance's own Prometheus metrics (`GET /metrics`): counters and histograms the hot paths
update as things happen, and gauges of live state (replicas, requests in flight, GPUs) read from
their owners when a scrape asks. One registry per application, so two in one process never mix."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from appliance.domain.placement import Allocation, GpuInfo

# Seconds: from a few ms (a cached answer) to minutes (a long generation).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PROBE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
EXPOSITION_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes: the classic text format


@dataclass
class Live:
    """What the gauges show, read from the supervisor, the gateway and NVML at scrape time."""

    replicas: dict[str, dict[str, int]] = field(default_factory=dict)  # endpoint -> state -> count
    inflight: dict[str, int] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    gpus: Sequence[GpuInfo] = ()
    held: dict[str, Allocation] = field(default_factory=dict)  # replica id -> its GPUs
    replica_endpoint: dict[str, str] = field(default_factory=dict)
    claims: dict[str, int] = field(default_factory=dict)  # device ("host", or a GPU's uuid) → bytes replicas claim there
    budgets: dict[str, int] = field(default_factory=dict)  # device → bytes the appliance hands out of it


class _LiveCollector(Collector):
    def __init__(self) -> None:
        self.live = Live()

    def collect(self) -> Iterator[Metric]:
        live = self.live
        replicas = GaugeMetricFamily("appliance_replicas", "Replicas by endpoint and state", labels=["endpoint", "state"])
        for endpoint, states in sorted(live.replicas.items()):
            for state, n in sorted(states.items()):
                replicas.add_metric([endpoint, state], n)
        yield replicas
        yield _per_endpoint("appliance_requests_in_flight", "Requests a replica is answering, by endpoint", live.inflight)
        yield _per_endpoint("appliance_requests_queued", "Requests waiting for a replica, by endpoint", live.queued)
        util = GaugeMetricFamily("appliance_gpu_utilization_ratio", "GPU busy time over NVML's last sample period (0-1)", labels=["gpu"])
        used = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        info = InfoMetricFamily("appliance_gpu", "Each GPU NVML sees", labels=["gpu", "uuid", "name"])
        for g in live.gpus:
            gpu = str(g.index)
            if g.utilization_gpu is not None:
                util.add_metric([gpu], g.utilization_gpu / 100)
            used.add_metric([gpu], g.memory_used)
            total.add_metric([gpu], g.memory_total)
            info.add_metric([gpu, g.uuid, g.name], {})
        yield from (util, used, total, info)
        index = {g.uuid: str(g.index) for g in live.gpus}
        holders = GaugeMetricFamily(
            "appliance_gpu_allocation_share", "The share of a GPU a replica holds (1 = the whole GPU)", labels=["gpu", "endpoint", "replica"]
        )
        for replica, allocation in sorted(live.held.items()):
            for uuid in allocation.uuids:
                holders.add_metric([index.get(uuid, uuid), live.replica_endpoint.get(replica, ""), replica], allocation.share or 1.0)
        yield holders
        claimed = GaugeMetricFamily("appliance_memory_claimed_bytes", "Memory the replicas claim (and reserve for a load), by device: a GPU's index, or host", labels=["device"])
        budgets = GaugeMetricFamily("appliance_memory_budget_bytes", "Memory the appliance hands out, by device: a GPU's total less [gpus] memory_reserve, or [residency] host_memory_budget", labels=["device"])
        for device, n in sorted(live.budgets.items()):
            budgets.add_metric([index.get(device, device)], n)
            claimed.add_metric([index.get(device, device)], live.claims.get(device, 0))
        yield from (claimed, budgets)


def _per_endpoint(name: str, text: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=["endpoint"])
    for endpoint, n in sorted(values.items()):
        family.add_metric([endpoint], n)
    return family


class _Hist:
    """A histogram's counts, updated on the event loop without a lock (the gateway's hot path)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class _PerEndpoint:
    """Everything the gateway counts for one endpoint."""

    __slots__ = ("by_status", "completion", "duration", "gap", "prompt", "ttft")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.duration = _Hist(DURATION_BUCKETS)
        self.ttft = _Hist(TTFT_BUCKETS)
        self.gap = _Hist(TOKEN_GAP_BUCKETS)
        self.prompt = 0
        self.completion = 0


class _RequestCollector(Collector):
    def __init__(self) -> None:
        self.endpoints: dict[str, _PerEndpoint] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("appliance_requests", "Requests the gateway answered, by endpoint and HTTP status", labels=["endpoint", "status"])
        prompt = CounterMetricFamily("appliance_prompt_tokens", "Prompt tokens, as the workers reported them", labels=["endpoint"])
        completion = CounterMetricFamily("appliance_completion_tokens", "Completion tokens, as the workers reported them", labels=["endpoint"])
        hists = {
            "duration": HistogramMetricFamily("appliance_request_duration_seconds", "Time from a request's arrival to the end of its answer", labels=["endpoint"]),
            "ttft": HistogramMetricFamily("appliance_time_to_first_token_seconds", "Streams: time from arrival to the answer's first chunk", labels=["endpoint"]),
            "gap": HistogramMetricFamily("appliance_inter_token_seconds", "Streams: mean time between the answer's chunks, one observation per stream",
                                         labels=["endpoint"]),
        }
        for name, per in sorted(self.endpoints.items()):
            for status, n in sorted(per.by_status.items()):
                requests.add_metric([name, str(status)], n)
            prompt.add_metric([name], per.prompt)
            completion.add_metric([name], per.completion)
            for attr, family in hists.items():
                hist: _Hist = getattr(per, attr)
                family.add_metric([name], hist.buckets(), hist.total)
        yield from (requests, prompt, completion, *hists.values())


class Telemetry:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._rejections = Counter("appliance_rejections", "Requests the appliance answered with a 4xx itself, by code: malformed, unknown model or route, auth, limits", ["code"], registry=r)
        self._restarts = Counter("appliance_replica_restarts", "Replica restarts after a crash or failed start", ["endpoint"], registry=r)
        self._probe_failures = Counter("appliance_health_probe_failures", "Failed health probes", ["endpoint", "replica"], registry=r)
        self._probe_duration = Histogram(
            "appliance_health_probe_duration_seconds", "Health probe latency", ["endpoint"], buckets=PROBE_BUCKETS, registry=r
        )
        self._decisions = Counter(
            "appliance_autoscaler_decisions", "Scaling decisions applied, by direction and rule (idle: the idle timeout)", ["endpoint", "direction", "rule"],
            registry=r,
        )
        self._loads = Histogram(
            "appliance_endpoint_load_seconds", "Loads of an endpoint that had no replica (a request or /load asked for it), by the seconds to its first healthy replica",
            ["endpoint"], buckets=LOAD_BUCKETS, registry=r,
        )
        self._evictions = Counter(
            "appliance_endpoint_evictions", "Endpoints unloaded, by reason: room (for another endpoint), idle (keep_alive), unload (asked for)",
            ["endpoint", "reason"], registry=r,
        )
        self._sleeps = Counter("appliance_replica_sleeps", "Replicas evicted by their engine's sleep (or found asleep)", ["endpoint"], registry=r)
        self._wakes = Histogram(
            "appliance_replica_wake_seconds", "Sleeping replicas woken for a request, by the seconds from the wake to serving (room made included)",
            ["endpoint"], buckets=LOAD_BUCKETS, registry=r,
        )
        self._grpc = Counter(
            "appliance_grpc_calls", "gRPC calls by endpoint (empty: refused before one was known), KServe v2 method (other: any other) and status code",
            ["endpoint", "method", "code"], registry=r,
        )
        self._grpc_children: dict[tuple[str, str, str], Counter] = {}
        self._requests = _RequestCollector()
        self._live = _LiveCollector()
        r.register(self._requests)
        r.register(self._live)

    def request(
        self, endpoint: str, status: int, seconds: float, *, ttft: float | None, gap: float | None, prompt: int | None, completion: int | None
    ) -> None:
        """One answered request: plain arithmetic on the event loop, turned into series when scraped."""
        per = self._requests.endpoints.get(endpoint)
        if per is None:
            per = self._requests.endpoints[endpoint] = _PerEndpoint()
        per.by_status[status] = per.by_status.get(status, 0) + 1
        per.duration.observe(seconds)
        if ttft is not None:
            per.ttft.observe(ttft)
        if gap is not None:
            per.gap.observe(gap)
        if prompt:
            per.prompt += prompt
        if completion:
            per.completion += completion

    def grpc_call(self, endpoint: str, method: str, code: str) -> None:
        child = self._grpc_children.get((endpoint, method, code))
        if child is None:  # labels() costs microseconds per call: each series is looked up once
            child = self._grpc_children[(endpoint, method, code)] = self._grpc.labels(endpoint, method, code)
        child.inc()

    def rejected(self, code: str) -> None:
        self._rejections.labels(code).inc()

    def restarted(self, endpoint: str) -> None:
        self._restarts.labels(endpoint).inc()

    def probed(self, endpoint: str, replica: str, passed: bool, seconds: float) -> None:
        self._probe_duration.labels(endpoint).observe(seconds)
        if not passed:
            self._probe_failures.labels(endpoint, replica).inc()

    def replica_gone(self, endpoint: str, replica: str) -> None:
        """A finished replica's own series go (replica ids are not reused: they would pile up)."""
        self._probe_failures.remove_by_labels({"endpoint": endpoint, "replica": replica})

    def endpoint_gone(self, endpoint: str) -> None:
        """A deleted endpoint's series go (a validation's temporary one too)."""
        for metric in (self._restarts, self._probe_failures, self._probe_duration, self._decisions, self._loads, self._evictions, self._grpc):
            metric.remove_by_labels({"endpoint": endpoint})
        self._grpc_children = {k: v for k, v in self._grpc_children.items() if k[0] != endpoint}
        self._requests.endpoints.pop(endpoint, None)

    def loaded(self, endpoint: str, seconds: float) -> None:
        self._loads.labels(endpoint).observe(seconds)

    def evicted(self, endpoint: str, reason: str) -> None:
        self._evictions.labels(endpoint, reason).inc()

    def slept(self, endpoint: str) -> None:
        self._sleeps.labels(endpoint).inc()

    def woke(self, endpoint: str, seconds: float) -> None:
        self._wakes.labels(endpoint).observe(seconds)

    def decided(self, endpoint: str, direction: str, rule: str | None) -> None:
        self._decisions.labels(endpoint, direction, rule or "idle").inc()

    def exposition(self, live: Live) -> bytes:
        self._live.live = live
        return generate_latest(self.registry)

