"""Service benchmark: the remote API against a bare gRPC echo (the floor), the local engine and PyTorch.

    python bench/service.py [--calls 2000] [--json PATH]
    python bench/service.py --smoke      # the same at tiny sizes and counts, seconds (run by the tests)

Starts a gradserve server and an echo server (same grpcio, same thread pool, raw bytes in and
out) as child processes on 127.0.0.1, then measures in one run:
  - p50/p99 latency: echo of a scalar Gradient request's bytes vs the cached remote scalar
    gradient vs the same gradient run locally;
  - the MLP gradient remote vs local PyTorch, with every tensor sent at each call and with the
    parameters resident on the server (`remote.put`, gradients still returned);
  - throughput with --clients (8) concurrent clients, remote scalar gradient vs echo;
  - a residual-session VJP call on the MLP vs a full remote Gradient call;
  - loopback bulk transfer: `remote.put` then `remote.get` of --transfer-mib (64) MiB, in GB/s,
    next to the same bytes sent as one plain request (an Evaluate input; it includes a sum).
Each call's bytes in and out are read from the server's `gradserve_bytes_total` counter (its
metrics port) and printed per call next to the times.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import gradserve as gs
from gradserve_engine.ir import tensor_to_proto
from gradserve_engine.v1 import service_pb2 as pb

ECHO = "bench.Echo/Echo"
MLP_SHAPE = (256, 784, 1024, 10)  # batch, inputs, hidden, classes
SMOKE_SHAPE = (16, 24, 32, 10)


def echo_server(port_file: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handler = grpc.unary_unary_rpc_method_handler(lambda raw, ctx: raw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc, address, _ = start_with_metrics(cmd)
    return proc, address


def start_with_metrics(cmd: list[str]) -> tuple[subprocess.Popen, str, int | None]:
    """A server child process; its address and, when it serves them, its metrics port."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    metrics = re.search(r"metrics on [\d.]+:(\d+)/metrics", line)
    return proc, line.split()[3].rstrip(","), int(metrics[1]) if metrics else None


class ByteCounter:
    """The server's request and response byte counters (gradserve_bytes_total), read over HTTP."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1

    def read(self) -> tuple[float, float]:
        with self.opener.open(self.url, timeout=10) as r:
            text = r.read().decode()
        values = dict.fromkeys(("in", "out"), 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "gradserve_bytes_total" and sample.labels.get("path") == "client_server":
                    values[sample.labels["direction"]] += sample.value  # summed over --processes
        return values["in"], values["out"]

    def per_call(self, call, n: int) -> tuple[list[float], float, float]:
        """`latencies(call, n)` and the bytes in and out per call (warm-up calls included)."""
        b_in, b_out = self.read()
        lat = latencies(call, n)
        a_in, a_out = self.read()
        calls = n + min(50, n)
        return lat, (a_in - b_in) / calls, (a_out - b_out) / calls


def latencies(call, n: int) -> list[float]:
    for _ in range(min(50, n)):
        call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def interleaved(calls: list, n: int) -> list[list[float]]:
    """Latencies of each call, the calls taking turns (after min(50, n) warm-up rounds)."""
    for _ in range(min(50, n)):
        for call in calls:
            call()
    out: list[list[float]] = [[] for _ in calls]
    for _ in range(n):
        for k, call in enumerate(calls):
            t = time.perf_counter()
            call()
            out[k].append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3


def throughput(make_call, clients: int, seconds: float) -> float:
    """Calls per second with `clients` threads, each with its own connection."""
    calls = [make_call() for _ in range(clients)]
    for c in calls:
        c()
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def run(k: int) -> None:
        while time.perf_counter() < stop:
            calls[k]()
            done[k] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def seed_f(x, y):
    return x * y + gs.sin(x)


def mlp_loss(params, x, y):
    h = gs.tanh(x @ params["w1"] + params["b1"])
    h = gs.tanh(h @ params["w2"] + params["b2"])
    return gs.cross_entropy(h @ params["w3"] + params["b3"], y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per latency measurement")
    parser.add_argument("--mlp-calls", type=int, default=20, help="calls per MLP latency measurement")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the throughput measurement")
    parser.add_argument("--processes", type=int, default=1,
                        help="server processes (gradserve serve --processes; the echo server stays one process)")
    parser.add_argument("--transfer-mib", type=int, default=64, help="MiB moved by the put/get measurement")
    parser.add_argument("--transfer-repeat", type=int, default=7, help="put/get rounds (the median is reported)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny MLP (batch 16, 24 -> 32 -> 32 -> 10), 20 calls per latency, 2 clients for 0.3 s, "
                             "put/get of 4 MiB: the same code in seconds, for the tests (the numbers mean nothing)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(calls=20, mlp_calls=5, seconds=0.3, clients=2, transfer_mib=4, transfer_repeat=2)
    args = parser.parse_args(argv)
    batch, d_in, d_h, d_out = SMOKE_SHAPE if args.smoke else MLP_SHAPE
    if args.smoke:
        print(f"# smoke run: MLP batch {batch}, {d_in} -> {d_h} -> {d_h} -> {d_out}, {args.calls} calls per latency, "
              f"{args.clients} clients for {args.seconds:g} s: checks that everything runs, the numbers mean nothing",
              flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="gradserve-bench-")  # removed at the end: the tests run this often
    port_file = str(Path(tmp.name) / "echo-port")
    echo = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                             f"import service; service.echo_server({port_file!r})"])
    server, address, metrics_port = start_with_metrics([sys.executable, "-m", "gradserve_server", "--port", "0",
                                                        "--metrics-port", "0", "--log-level", "warning",
                                                        "--processes", str(args.processes)])
    while not Path(port_file).exists() or not Path(port_file).read_text():
        if echo.poll() is not None:
            server.terminate()
            raise SystemExit(f"the echo server exited with status {echo.returncode}")
        time.sleep(0.05)
    echo_addr = f"127.0.0.1:{Path(port_file).read_text()}"
    rows: dict[str, float] = {}
    per_call: dict[str, tuple[float, float, float]] = {}  # call -> (p50 ms, bytes in, bytes out) per call
    transfers: dict[str, tuple[float, float, float, float]] = {}  # put/get -> (bytes in, bytes out, ms, GB/s)
    try:
        assert metrics_port is not None
        counter = ByteCounter(metrics_port)
        remote = gs.connect(address)
        graph = gs.trace(seed_f, 2.0, 3.0)
        req = pb.GradientRequest(graph_id=graph.id, wrt=["x", "y"])
        for k, v in {"x": 2.0, "y": 3.0}.items():
            tensor_to_proto(np.asarray(v), req.inputs[k])
        payload = req.SerializeToString()

        def echo_call_factory():
            channel = grpc.insecure_channel(echo_addr, options=[("grpc.use_local_subchannel_pool", 1)])  # as a session's
            stub = channel.unary_unary(f"/{ECHO}", request_serializer=None, response_deserializer=None)
            return lambda: stub(payload, timeout=10)

        def remote_call_factory():
            session = gs.connect(address)
            g = session.grad(seed_f, argnums=(0, 1))
            return lambda: g(2.0, 3.0)

        echo_lat = latencies(echo_call_factory(), args.calls)
        remote_grad = remote.grad(seed_f, argnums=(0, 1))
        remote_lat, b_in, b_out = counter.per_call(lambda: remote_grad(2.0, 3.0), args.calls)
        per_call["remote scalar grad"] = (pct(remote_lat, 50), b_in, b_out)
        local_grad = gs.grad(seed_f, argnums=(0, 1))
        local_lat = latencies(lambda: local_grad(2.0, 3.0), args.calls)
        rows.update({"echo p50 ms": pct(echo_lat, 50), "echo p99 ms": pct(echo_lat, 99),
                     "remote scalar grad p50 ms": pct(remote_lat, 50), "remote scalar grad p99 ms": pct(remote_lat, 99),
                     "local scalar grad p50 ms": pct(local_lat, 50)})

        rng = np.random.default_rng(0)
        shapes = {"w1": (d_in, d_h), "b1": (d_h,), "w2": (d_h, d_h), "b2": (d_h,), "w3": (d_h, d_out), "b3": (d_out,)}
        params = {k: rng.standard_normal(s) * 0.03 for k, s in shapes.items()}
        x, y = rng.standard_normal((batch, d_in)), rng.integers(0, d_out, batch)
        remote_mlp = remote.grad(mlp_loss)
        n_mlp = args.mlp_calls
        mlp_remote, b_in, b_out = counter.per_call(lambda: remote_mlp(params, x, y), n_mlp)
        per_call["remote MLP grad"] = (pct(mlp_remote, 50), b_in, b_out)
        resident = remote.put(params)  # the parameters stay on the server; x and y travel, the gradients come back
        mlp_resident, b_in, b_out = counter.per_call(lambda: remote_mlp(resident, x, y), n_mlp)
        per_call["remote MLP grad, resident params"] = (pct(mlp_resident, 50), b_in, b_out)
        for got, want in zip(remote_mlp(resident, x, y).values(), remote_mlp(params, x, y).values(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        import torch

        tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        tx, ty = torch.tensor(x), torch.tensor(y)

        def torch_mlp():
            h = torch.tanh(tx @ tp["w1"] + tp["b1"])
            h = torch.tanh(h @ tp["w2"] + tp["b2"])
            loss = torch.nn.functional.cross_entropy(h @ tp["w3"] + tp["b3"], ty)
            return torch.autograd.grad(loss, list(tp.values()))

        mlp_torch = latencies(torch_mlp, n_mlp)
        # the same pair again, call for call in turn: a busy machine slows both alike, so their ratio holds
        paired_resident, paired_torch = interleaved([lambda: remote_mlp(resident, x, y), torch_mlp], n_mlp)
        rows.update({"remote MLP grad p50 ms": pct(mlp_remote, 50), "local PyTorch MLP grad p50 ms": pct(mlp_torch, 50),
                     "remote MLP grad, resident params p50 ms": pct(mlp_resident, 50),
                     "remote MLP grad, resident params, interleaved with PyTorch p50 ms": pct(paired_resident, 50),
                     "local PyTorch MLP grad, interleaved p50 ms": pct(paired_torch, 50)})

        _, vjp_fn = remote.vjp(mlp_loss, params, x, y)
        vjp_lat, b_in, b_out = counter.per_call(lambda: vjp_fn(1.0), n_mlp)
        per_call["residual-session VJP call"] = (pct(vjp_lat, 50), b_in, b_out)
        vjp_fn.close()
        rows.update({"residual-session VJP call p50 ms": pct(vjp_lat, 50)})

        size = args.transfer_mib << 20
        bulk = np.random.default_rng(1).random(size // 8)
        put_s, get_s, plain_s = [], [], []
        moved = {"put": [0.0, 0.0], "get": [0.0, 0.0], "plain": [0.0, 0.0]}
        total = gs.trace(lambda x: gs.sum(x), bulk)  # the reference: the same bytes as one plain request's input
        for _ in range(args.transfer_repeat):
            b = counter.read()
            t = time.perf_counter()
            remote.evaluate(total, {"x": bulk})
            plain_s.append(time.perf_counter() - t)
            a = counter.read()
            moved["plain"] = [a[0] - b[0], a[1] - b[1]]
            b0 = counter.read()
            t = time.perf_counter()
            ref = remote.put(bulk, hold=False)
            put_s.append(time.perf_counter() - t)
            b1 = counter.read()
            t = time.perf_counter()
            back = remote.get(ref)
            get_s.append(time.perf_counter() - t)
            b2 = counter.read()
            assert back.shape == bulk.shape and np.array_equal(back, bulk)
            remote.release(ref)
            for k, (before, after) in {"put": (b0, b1), "get": (b1, b2)}.items():
                moved[k] = [after[0] - before[0], after[1] - before[1]]
            del back
        for k, label, times in (("plain", f"plain request {args.transfer_mib} MiB (Evaluate input)", plain_s),
                                ("put", f"put {args.transfer_mib} MiB", put_s), ("get", f"get {args.transfer_mib} MiB", get_s)):
            med = float(np.median(times))
            transfers[label] = (moved[k][0], moved[k][1], med * 1e3, size / med / 1e9)
        rows[f"put {args.transfer_mib} MiB GB/s"] = transfers[f"put {args.transfer_mib} MiB"][3]
        rows[f"get {args.transfer_mib} MiB GB/s"] = transfers[f"get {args.transfer_mib} MiB"][3]

        rows[f"echo {args.clients} clients calls/s"] = throughput(echo_call_factory, args.clients, args.seconds)
        rows[f"remote scalar grad {args.clients} clients calls/s"] = throughput(remote_call_factory, args.clients,
                                                                               args.seconds)
        remote.close()
    finally:
        server.terminate()
        echo.terminate()
        server.wait()
        echo.wait()
        tmp.cleanup()

    ratios = {
        "remote scalar grad / echo (p50)": rows["remote scalar grad p50 ms"] / rows["echo p50 ms"],
        "remote / local scalar grad (p50)": rows["remote scalar grad p50 ms"] / rows["local scalar grad p50 ms"],
        "remote MLP / local PyTorch MLP": rows["remote MLP grad p50 ms"] / rows["local PyTorch MLP grad p50 ms"],
        f"{args.clients}-client throughput / echo's": (rows[f"remote scalar grad {args.clients} clients calls/s"]
                                                       / rows[f"echo {args.clients} clients calls/s"]),
        "residual VJP / full remote Gradient (MLP)": rows["residual-session VJP call p50 ms"] / rows["remote MLP grad p50 ms"],
        "remote MLP (resident params) / local PyTorch MLP": (rows["remote MLP grad, resident params p50 ms"]
                                                             / rows["local PyTorch MLP grad p50 ms"]),
        "remote MLP (resident params) / local PyTorch MLP, interleaved": (
            rows["remote MLP grad, resident params, interleaved with PyTorch p50 ms"]
            / rows["local PyTorch MLP grad, interleaved p50 ms"]),
    }
    print("| measurement | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |" if v < 100 else f"| {k} | {v:.0f} |")
    print("\n| ratio | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.2f}x |")
    print("\n| call | p50 ms | bytes in per call | bytes out per call |\n|---|---|---|---|")
    for k, (ms, b_in, b_out) in per_call.items():
        print(f"| {k} | {ms:.3f} | {b_in:,.0f} | {b_out:,.0f} |")
    print("\n| transfer (loopback, median) | bytes in | bytes out | ms | GB/s |\n|---|---|---|---|---|")
    for k, (b_in, b_out, ms, gbs) in transfers.items():
        print(f"| {k} | {b_in:,.0f} | {b_out:,.0f} | {ms:.1f} | {gbs:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "per_call": per_call, "transfers": transfers},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
