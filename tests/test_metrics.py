"""The server's /metrics: valid text and OpenMetrics expositions (prometheus_client's parsers read
them back), exact large counters, escaped labels, latency histograms, process metrics, and every
answer counted, refused ones included."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from service_fixtures import channel, metric, parse_metrics, rpc_error, scrape

import gradserve as gs
from gradserve_server.metrics import Metrics

TOKEN = "metrics-test-token"


def _f(x, y):
    return gs.sum(gs.sin(x) * y)


def test_counters_stay_exact_and_labels_are_escaped():
    m = Metrics()
    m.inc("gradserve_bytes_total", 1234567, path="client_server", direction="in")
    m.inc("gradserve_bytes_total", 2**52 + 1, path="client_server", direction="out")
    m.inc("gradserve_tensors_dropped_total", reason='odd "reason"\\ with\nnewline')
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    samples = parse_metrics(body.decode())
    assert metric(samples, "gradserve_bytes_total", path="client_server", direction="in") == 1234567
    assert metric(samples, "gradserve_bytes_total", path="client_server", direction="out") == 2**52 + 1
    assert metric(samples, "gradserve_tensors_dropped_total", reason='odd "reason"\\ with\nnewline') == 1


def test_openmetrics_when_the_scraper_asks_for_it():
    m = Metrics()
    m.observe_request("Gradient", "OK", 0.003)
    m.observe_request("Gradient", "OK", 0.2)
    m.gauge_fn("gradserve_calls_by_mode_total", lambda: 7, mode="in_process")
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # raises on anything invalid
    assert families["gradserve_requests"].type == "counter"
    assert families["gradserve_request_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in families["gradserve_request_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.0025"] == 0 and buckets["0.005"] == 1 and buckets["0.25"] == 2 and buckets["+Inf"] == 2
    assert {s.value for s in families["gradserve_calls_by_mode"].samples} == {7}
    assert "process_resident_memory_bytes" in families and "process_cpu_seconds" in families


def test_every_answer_is_counted_in_a_histogram_and_by_mode(serve_in_process):
    server = serve_in_process(metrics_port=0)
    x = np.linspace(0.1, 1.0, 4)
    with gs.connect(f"127.0.0.1:{server.port}") as remote:
        for _ in range(3):
            remote.grad(_f)(x, x)
    samples = parse_metrics(scrape(server.metrics_port))
    assert metric(samples, "gradserve_requests_total", method="Gradient", code="OK") == 3
    assert metric(samples, "gradserve_request_seconds_count", method="Gradient") == 3
    assert metric(samples, "gradserve_request_seconds_bucket", method="Gradient", le="+Inf") == 3
    assert metric(samples, "gradserve_mode_seconds_count", mode="in_process") == 3  # the scheduler's calls
    assert metric(samples, "process_resident_memory_bytes") > 0


def test_refused_calls_are_counted_without_new_label_values(serve_in_process):
    server = serve_in_process(metrics_port=0, token=TOKEN)
    ch = channel(f"127.0.0.1:{server.port}")
    try:
        list_graphs = ch.unary_unary("/gradserve.v1.GradientService/ListGraphs", request_serializer=None,
                                     response_deserializer=None)
        err = rpc_error(list_graphs, b"", metadata=(("authorization", "Bearer wrong"),), timeout=10)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        made_up = ch.unary_unary("/gradserve.v1.GradientService/No\"Such", request_serializer=None,
                                 response_deserializer=None)
        assert rpc_error(made_up, b"", timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        ch.close()
    samples = parse_metrics(scrape(server.metrics_port))
    assert metric(samples, "gradserve_requests_total", method="ListGraphs", code="UNAUTHENTICATED") == 1
    assert metric(samples, "gradserve_requests_total", method="other", code="UNAUTHENTICATED") == 1
    methods = {dict(labels).get("method") for name, labels in samples if name == "gradserve_requests_total"}
    assert methods == {"ListGraphs", "other"}  # a caller's made-up path never becomes a series


def test_only_the_metrics_path_is_served(serve_in_process):
    server = serve_in_process(metrics_port=0)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(f"http://127.0.0.1:{server.metrics_port}/other", timeout=5)
        raise AssertionError("served a path other than /metrics")
    except urllib.error.HTTPError as e:
        assert e.code == 404
