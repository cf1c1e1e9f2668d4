"""Prometheus metrics, served over HTTP on their own port.

prometheus_client does the exposition (text format 0.0.4, or OpenMetrics when the scraper asks
for it), label escaping and number formatting, the latency histograms and the process metrics
(CPU, memory, file descriptors). Counters and gauges keep a plain dict here, keyed by name and
labels, because some of them are read from functions at scrape time (the scheduler's counts,
the job manager's state) and a name may have both kinds of series (`gradserve_bytes_total`
counts client traffic here and worker traffic in the scheduler).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# name -> (kind, help, label names)
SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gradserve_requests_total": ("counter", "RPCs answered, by method and status code (refused calls included)",
                                 ("method", "code")),
    "gradserve_request_seconds": ("histogram", "Seconds spent answering RPCs, by method", ("method",)),
    "gradserve_mode_seconds": ("histogram", "Wall seconds of gradient calls, by the execution mode that ran them",
                               ("mode",)),
    "gradserve_graph_cache_hits_total": ("counter", "Graph lookups served from memory", ()),
    "gradserve_graph_cache_misses_total": ("counter", "Graph lookups not in memory", ()),
    "gradserve_graph_cache_evictions_total": ("counter", "Graphs evicted from memory (LRU by bytes)", ()),
    "gradserve_graph_cache_bytes": ("gauge", "Bytes of graphs held in memory", ()),
    "gradserve_graphs": ("gauge", "Graphs held in memory", ()),
    "gradserve_plan_cache_hits_total": ("counter", "Compiled plans reused", ()),
    "gradserve_plan_cache_misses_total": ("counter", "Plans compiled", ()),
    "gradserve_plan_cache_bytes": ("gauge", "Estimated bytes of the plans, derived graphs and analyses the engine keeps", ()),
    "gradserve_residual_sessions": ("gauge", "Open residual (VJP) sessions", ()),
    "gradserve_residual_bytes": ("gauge", "Bytes kept alive by residual sessions (each buffer under their values once)",
                                 ()),
    "gradserve_residual_sessions_released_total": ("counter", "Residual sessions closed, expired or evicted", ()),
    "gradserve_inflight_requests": ("gauge", "RPCs being answered now", ()),
    "gradserve_workers": ("gauge", "Worker processes in the pool (0: everything runs in process)", ()),
    "gradserve_calls_by_mode_total": ("counter", "Gradient calls by execution mode the scheduler chose", ("mode",)),
    "gradserve_workers_replaced_total": ("counter", "Workers that died and were replaced", ()),
    "gradserve_kernels_info": ("gauge", "The kernels plans run on: mode (what runs) and requested", ("mode", "requested")),
    "gradserve_bytes_total": ("counter", "Serialised request (in) and response (out) bytes, by path and direction",
                              ("path", "direction")),
    "gradserve_tensor_store_bytes": ("gauge", "Bytes of tensors held in the tensor store", ()),
    "gradserve_tensors": ("gauge", "Tensors held in the tensor store", ()),
    "gradserve_tensors_dropped_total": ("counter", "Stored tensors dropped, by reason (evicted, expired, released)",
                                        ("reason",)),
    "gradserve_jobs_active": ("gauge", "Optimisation jobs held in memory (queued or running on this server)", ()),
    "gradserve_job_waiters": ("gauge", "Calls waiting on jobs now (WatchJob streams, cancels; at most --max-watchers)", ()),
    "gradserve_health_watchers": ("gauge", "Health Watch streams open now (at most --max-health-watchers)", ()),
    "gradserve_job_lease": ("gauge", "1 while this server holds its store's job lease (runs the jobs)", ()),
    "gradserve_serving": ("gauge", "1 while health reports SERVING", ()),
}
# RPC latency from a cached scalar gradient (~0.2 ms) to a long Hessian (minutes)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0)

Key = tuple[str, tuple[tuple[str, str], ...]]


class Metrics:
    """The server's metrics: counters and gauges by (name, labels), histograms, process metrics;
    thread-safe. Each instance has its own registry (a test may run several servers)."""

    def __init__(self) -> None:
        self._values: dict[Key, float] = {}
        self._fns: dict[Key, Callable[[], float]] = {}
        self._lock = threading.Lock()
        self._checked: set[Key] = set()  # series whose name and labels were checked against SPECS
        self._request_timers: dict[str, Histogram] = {}  # method -> its child of gradserve_request_seconds
        self.registry = CollectorRegistry(auto_describe=True)
        self._histograms = {name: Histogram(name, text, labels, registry=self.registry, buckets=LATENCY_BUCKETS)
                            for name, (kind, text, labels) in SPECS.items() if kind == "histogram"}
        self.registry.register(Families(self._families))
        ProcessCollector(registry=self.registry)

    def _key(self, name: str, labels: dict[str, str]) -> Key:
        key = (name, tuple(sorted(labels.items())))
        if key not in self._checked:  # each series is checked against SPECS once: this runs on every RPC
            kind, _, names = SPECS[name]  # a KeyError here is a name missing from SPECS
            if kind == "histogram" or set(labels) != set(names):
                raise ValueError(f"metric {name} is a {kind} with labels {names}, given {sorted(labels)}")
            self._checked.add(key)
        return key

    def gauge_fn(self, name: str, fn: Callable[[], float], **labels: str) -> None:
        """A value read when the metrics are scraped (nothing to update on the hot path)."""
        key = self._key(name, labels)
        with self._lock:
            self._fns[key] = fn

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        self._histograms[name].labels(**labels).observe(seconds)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Count one answered (or refused) RPC and its time."""
        self.inc("gradserve_requests_total", method=method, code=code)
        timer = self._request_timers.get(method)
        if timer is None:  # labels() takes a lock and builds a key: once per method
            timer = self._request_timers[method] = self._histograms["gradserve_request_seconds"].labels(method=method)
        timer.observe(seconds)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._values[key] = float(value)

    def get(self, name: str, **labels: str) -> float:
        """The value of one series (0 when it has none yet); a histogram's by its sample name
        (`gradserve_request_seconds_count`, `..._sum`)."""
        if name in SPECS:
            key = self._key(name, labels)
            with self._lock:
                fn, value = self._fns.get(key), self._values.get(key, 0.0)
            return value + (float(fn()) if fn is not None else 0.0)
        sample = self.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for a scraper that sent `accept` (OpenMetrics when it asks): (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def _families(self) -> Iterator[Metric]:
        with self._lock:
            values, fns = dict(self._values), dict(self._fns)
        for key, fn in fns.items():
            values[key] = values.get(key, 0.0) + float(fn())
        by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
        for (name, labels), value in sorted(values.items()):
            by_name.setdefault(name, []).append((labels, value))
        for name, series in by_name.items():
            kind, text, label_names = SPECS[name]
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, text, labels=label_names)
            for labels, value in series:
                given = dict(labels)
                family.add_metric([given[n] for n in label_names], value)
            yield family

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """Serve /metrics on (host, port) from a daemon thread; returns the HTTP server."""
        return serve_exposition(host, port, self.render)


def serve_exposition(host: str, port: int, render: Callable[[str], tuple[bytes, str]]) -> ThreadingHTTPServer:
    """Serve `render(accept header)` -> (body, content type) at /metrics on (host, port) from a
    daemon thread (404 elsewhere); returns the HTTP server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body, content_type = render(self.headers.get("Accept", ""))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, name="gradserve-metrics", daemon=True).start()
    return httpd


class Families(Collector):
    """A collector of the metric families `families()` gives at scrape time (series appear as
    they are first counted: nothing to describe up front)."""

    def __init__(self, families: Callable[[], Iterator[Metric]]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return self._families()

    def describe(self) -> Iterator[Metric]:
        return iter(())
