"""Prometheus metrics in the text exposition format, served over HTTP on their own port."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = {
    "gradserve_requests_total": ("counter", "RPCs answered, by method and status code"),
    "gradserve_request_seconds_sum": ("counter", "Total seconds spent answering RPCs, by method"),
    "gradserve_request_seconds_count": ("counter", "RPCs timed, by method"),
    "gradserve_graph_cache_hits_total": ("counter", "Graph lookups served from memory"),
    "gradserve_graph_cache_misses_total": ("counter", "Graph lookups not in memory"),
    "gradserve_graph_cache_evictions_total": ("counter", "Graphs evicted from memory (LRU by bytes)"),
    "gradserve_graph_cache_bytes": ("gauge", "Bytes of graphs held in memory"),
    "gradserve_graphs": ("gauge", "Graphs held in memory"),
    "gradserve_plan_cache_hits_total": ("counter", "Compiled plans reused"),
    "gradserve_plan_cache_misses_total": ("counter", "Plans compiled"),
    "gradserve_plan_cache_bytes": ("gauge", "Estimated bytes of the plans, derived graphs and analyses the engine keeps"),
    "gradserve_residual_sessions": ("gauge", "Open residual (VJP) sessions"),
    "gradserve_residual_bytes": ("gauge", "Bytes kept alive by residual sessions (each buffer under their values once)"),
    "gradserve_residual_sessions_released_total": ("counter", "Residual sessions closed, expired or evicted"),
    "gradserve_inflight_requests": ("gauge", "RPCs being answered now"),
    "gradserve_workers": ("gauge", "Worker processes in the pool (0: everything runs in process)"),
    "gradserve_calls_by_mode_total": ("counter", "Gradient calls by execution mode the scheduler chose"),
    "gradserve_mode_seconds_total": ("counter", "Wall seconds of gradient calls, by the execution mode that ran them"),
    "gradserve_workers_replaced_total": ("counter", "Workers that died and were replaced"),
    "gradserve_kernels_info": ("gauge", "The kernels plans run on: mode (what runs) and requested"),
    "gradserve_bytes_total": ("counter", "Serialised request (in) and response (out) bytes, by path and direction"),
    "gradserve_tensor_store_bytes": ("gauge", "Bytes of tensors held in the tensor store"),
    "gradserve_tensors": ("gauge", "Tensors held in the tensor store"),
    "gradserve_tensors_dropped_total": ("counter", "Stored tensors dropped, by reason (evicted, expired, released)"),
    "gradserve_jobs_active": ("gauge", "Optimisation jobs held in memory (queued or running on this server)"),
    "gradserve_job_waiters": ("gauge", "Calls waiting on jobs now (WatchJob streams, cancels; at most --max-watchers)"),
    "gradserve_job_lease": ("gauge", "1 while this server holds its store's job lease (runs the jobs)"),
    "gradserve_serving": ("gauge", "1 while health reports SERVING"),
}


class Metrics:
    """Counters and gauges keyed by (name, labels); thread-safe."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], Callable[[], float]] = {}
        self._lock = threading.Lock()

    def gauge_fn(self, name: str, fn: Callable[[], float], **labels: str) -> None:
        """A value read when the metrics are scraped (nothing to update on the hot path)."""
        self._gauges[(name, tuple(sorted(labels.items())))] = fn

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Count one answered RPC and its time: one lock for the three series."""
        labels: tuple[tuple[str, str], ...] = (("method", method),)
        with self._lock:
            v = self._values
            key: tuple[str, tuple[tuple[str, str], ...]] = ("gradserve_requests_total", (("code", code), ("method", method)))
            v[key] = v.get(key, 0.0) + 1
            key = ("gradserve_request_seconds_sum", labels)
            v[key] = v.get(key, 0.0) + seconds
            key = ("gradserve_request_seconds_count", labels)
            v[key] = v.get(key, 0.0) + 1

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = float(value)

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
        for key, fn in self._gauges.items():
            values[key] = float(fn())
        items = sorted(values.items())
        lines, seen = [], set()
        for (name, labels), value in items:
            if name not in seen and name in HELP:
                kind, text = HELP[name]
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            seen.add(name)
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {_number(value)}" if labels else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """Serve /metrics on (host, port) from a daemon thread; returns the HTTP server."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        httpd = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=httpd.serve_forever, name="gradserve-metrics", daemon=True).start()
        return httpd


def _number(value: float) -> str:
    """A sample's value, exact: counters of bytes pass a million, where `%g` would round them."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
