"""Load test: one gradserve server process on 127.0.0.1, many concurrent clients, mixed calls.

    python bench/load.py [--calls 10000] [--clients 64] [--channels 8] [--rounds 2] [--graphs 16]
                         [--cache-mib 64] [--max-growth-mib 8] [--max-seconds 600] [--json PATH]
    python bench/load.py --smoke     # 2 rounds of 100 calls from 4 clients over 4 graphs, seconds (run by the tests)

Starts `python -m gradserve_server --host 127.0.0.1 --port 0` and runs `--rounds` identical
rounds of `--calls` calls from `--clients` threads sharing `--channels` connections (`gs.connect`
sessions). The calls are a fixed mix over `--graphs` small graphs (an MLP-like loss of two
inputs): RegisterGraph 10%, Evaluate 30%, Gradient 40%, BatchGradient (4 items) 20%; every
result is checked against the local engine, so a wrong answer counts as an error.

Reports per round and call kind the latency percentiles (p50/p90/p99/max) and calls/s, and the
server's RSS (VmRSS from /proc/PID/status) before any call and after each round. Exit status 1
when any call failed or gave a wrong result, when a round did not finish within --max-seconds,
or when the RSS grew by more than --max-growth-mib after round 1 (identical rounds should
leave the server's memory flat: the graphs registered are far below --cache-mib).
Everything stays on 127.0.0.1 and is bounded in calls and time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import gradserve as gs
from gradserve_engine.engine import Engine

HOST = "127.0.0.1"
MiB = 1 << 20
MIX = ["register"] + ["evaluate"] * 3 + ["gradient"] * 4 + ["batch_gradient"] * 2  # one call in ten registers
KINDS = ["register", "evaluate", "gradient", "batch_gradient"]
BATCH = 4
RTOL, ATOL = 1e-9, 1e-12
_PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update({"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", "no_grpc_proxy": "127.0.0.1,localhost",
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


class Server:
    """`python -m gradserve_server` on 127.0.0.1 and a free port; its stderr goes to a temp file."""

    def __init__(self, cache_mib: int, timeout: float = 30.0):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, "-m", "gradserve_server", "--host", HOST, "--port", "0",
                                      "--cache-mib", str(cache_mib), "--log-level", "warning"],
                                     stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True,
                                     env=child_env())
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or "listening on" not in box[0]:
            self.close()
            raise RuntimeError(f"the server did not start: {box[:1]!r}\n{self.stderr()}")
        self.address = box[0].split("listening on ")[1].split(",")[0].strip()
        if not self.address.startswith(HOST + ":"):
            self.close()
            raise RuntimeError(f"the server listens on {self.address}, not {HOST}")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stderr(self) -> str:
        if self.log.closed:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------- the work


def make_graph(k: int):
    c = 1.0 + k / 16

    def loss(x, w):
        return gs.sum(gs.tanh(x @ w + c)) + c * gs.sum(x * x)

    loss.__qualname__ = f"load_loss_{k}"
    rng = np.random.default_rng(k)
    x, w = rng.standard_normal((8, 16)), rng.standard_normal((16, 4)) * 0.3
    graph = gs.trace(loss, x, w)
    names = graph.input_names()
    inputs = dict(zip(names, (x, w), strict=True))
    items = [dict(zip(names, (x + j, w), strict=True)) for j in range(BATCH)]
    return graph, inputs, items


class Workload:
    """The graphs, their inputs and the local engine's answers to every call in the mix."""

    def __init__(self, n_graphs: int):
        local = Engine()
        self.graphs, self.inputs, self.items, self.expect = [], [], [], []
        for k in range(n_graphs):
            graph, inputs, items = make_graph(k)
            names = graph.input_names()
            out = local.evaluate(graph, inputs)
            outs, grads = local.vjp(graph, inputs, names)
            batch = [local.vjp(graph, item, names[:1]) for item in items]
            self.graphs.append(graph)
            self.inputs.append(inputs)
            self.items.append(items)
            self.expect.append({"evaluate": out, "gradient": (outs, grads), "batch_gradient": batch})

    def call(self, session, i: int) -> str:
        """Call number `i` of a round (the same for every round); returns its kind. Raises on
        an error or a result that differs from the local engine's."""
        kind = MIX[i % len(MIX)]
        k = (i // len(MIX)) % len(self.graphs)
        graph, inputs, expect = self.graphs[k], self.inputs[k], self.expect[k]
        names = graph.input_names()
        if kind == "register":
            gid = session.register(graph)
            if gid != graph.id:
                raise AssertionError(f"registered as {gid}, expected {graph.id}")
        elif kind == "evaluate":
            _same(session.evaluate(graph, inputs), expect["evaluate"], "evaluate")
        elif kind == "gradient":
            res = session.gradient(graph, inputs, wrt=names)
            _same(res.outputs, expect["gradient"][0], "gradient outputs")
            _same(res.grads, expect["gradient"][1], "gradient grads")
        else:
            results = session.batch_gradient(graph, self.items[k], wrt=names[:1])
            if len(results) != BATCH:
                raise AssertionError(f"batch_gradient gave {len(results)} results for {BATCH} items")
            for res, (outs, grads) in zip(results, expect["batch_gradient"], strict=True):
                _same(res.outputs, outs, "batch outputs")
                _same(res.grads, grads, "batch grads")
        return kind


def _same(got: dict, want: dict, what: str) -> None:
    if sorted(got) != sorted(want):
        raise AssertionError(f"{what}: names {sorted(got)} != {sorted(want)}")
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        if a.shape != b.shape or a.dtype != b.dtype or not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            raise AssertionError(f"{what} {name!r} differs from the local engine")


# ---------------------------------------------------------------- a round


def run_round(work: Workload, sessions: list, calls: int, clients: int, max_seconds: float) -> dict:
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    barrier = threading.Barrier(clients + 1)

    def client(t: int) -> None:
        session = sessions[t % len(sessions)]
        mine: dict[str, list[float]] = defaultdict(list)
        failed: list[str] = []
        n = 0
        barrier.wait()
        for i in range(t, calls, clients):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                kind = work.call(session, i)
            except Exception as e:  # counted and reported
                failed.append(f"call {i} ({MIX[i % len(MIX)]}): {type(e).__name__}: {str(e)[:200]}")
            else:
                mine[kind].append(time.perf_counter() - start)
            n += 1
        with lock:
            for kind, values in mine.items():
                latencies[kind].extend(values)
            errors.extend(failed)
            done[0] += n

    threads = [threading.Thread(target=client, args=(t,), name=f"load-client-{t}") for t in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    table = {}
    for kind in KINDS:
        ms = np.asarray(latencies.get(kind, [])) * 1e3
        table[kind] = ({"count": int(ms.size), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                        "p99": float(np.percentile(ms, 99)), "max": float(ms.max())} if ms.size else {"count": 0})
    return {"calls": done[0], "seconds": seconds, "calls_per_s": done[0] / seconds if seconds else 0.0,
            "errors": len(errors), "error_samples": errors[:10], "latency_ms": table}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000, help="calls per round")
    p.add_argument("--clients", type=int, default=64, help="concurrent client threads")
    p.add_argument("--channels", type=int, default=8, help="connections shared by the clients")
    p.add_argument("--rounds", type=int, default=2, help="identical rounds (RSS is read after each)")
    p.add_argument("--graphs", type=int, default=16, help="distinct graphs in the mix")
    p.add_argument("--cache-mib", type=int, default=64, help="the server's --cache-mib")
    p.add_argument("--max-growth-mib", type=float, default=8.0, help="allowed RSS growth after round 1")
    p.add_argument("--max-seconds", type=float, default=600.0, help="time limit per round")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true",
                   help="2 rounds of 100 calls from 4 clients over 2 channels and 4 graphs, 60 s per round at most: "
                        "the same code and checks in seconds, for the tests (options given explicitly still apply)")
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(calls=100, clients=4, channels=2, rounds=2, graphs=4, max_seconds=60.0)
    args = p.parse_args(argv)
    if args.calls < 1 or args.clients < 1 or args.rounds < 1 or args.channels < 1 or args.graphs < 1:
        p.error("--calls, --clients, --rounds, --channels and --graphs must be positive")
    for k in _PROXY_VARS:  # the clients of this process go straight to 127.0.0.1
        os.environ.pop(k, None)
    os.environ.update({"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"})

    work = Workload(args.graphs)
    server = Server(args.cache_mib)
    result: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "rounds": [], "completed": False}
    sessions = []
    try:
        time.sleep(0.5)  # let the server settle before the first reading
        rss = [server.rss()]
        sessions = [gs.connect(server.address, timeout=60) for _ in range(min(args.channels, args.clients))]
        for r in range(args.rounds):
            stats = run_round(work, sessions, args.calls, args.clients, args.max_seconds)
            time.sleep(0.5)
            rss.append(server.rss())
            stats["round"] = r + 1
            stats["rss_mib"] = rss[-1] / MiB
            result["rounds"].append(stats)
        graphs = sessions[0].graphs()
        result["graph_cache_bytes"] = sum(g.bytes for g in graphs)
        result["graphs_registered"] = len(graphs)
    finally:
        for s in sessions:
            s.close()
        server.close()
        log = server.stderr()
        server.log.close()

    result["cache_limit_bytes"] = args.cache_mib * MiB
    result["rss_mib"] = {"before": rss[0] / MiB, "after": [v / MiB for v in rss[1:]]}
    result["growth_after_round1_mib"] = (max(rss[2:]) - rss[1]) / MiB if len(rss) > 2 else 0.0
    result["errors"] = sum(r["errors"] for r in result["rounds"])
    result["completed"] = all(r["calls"] == args.calls for r in result["rounds"])
    result["server_tracebacks"] = log.count("Traceback")
    report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} calls failed, e.g. {result['rounds'][0]['error_samples'][:3]}")
    if not result["completed"]:
        problems.append(f"not every round finished its {args.calls} calls within {args.max_seconds:.0f}s")
    if result["growth_after_round1_mib"] > args.max_growth_mib:
        problems.append(f"the server's RSS grew {result['growth_after_round1_mib']:.1f} MiB after round 1 "
                        f"(allowed {args.max_growth_mib} MiB)")
    if result["server_tracebacks"]:
        problems.append(f"the server logged {result['server_tracebacks']} tracebacks:\n{log[-3000:]}")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


def report(result: dict) -> None:
    c = result["config"]
    print(f"\n{c['calls']} calls per round x {len(result['rounds'])} rounds, {c['clients']} client threads over "
          f"{min(c['channels'], c['clients'])} channels, {c['graphs']} graphs, "
          f"server on 127.0.0.1 (--cache-mib {c['cache_mib']})\n")
    print("| round | call | count | p50 ms | p90 ms | p99 ms | max ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rounds"]:
        for kind in KINDS:
            s = r["latency_ms"][kind]
            if s["count"]:
                cells = " | ".join(f"{s[q]:.2f}" for q in ("p50", "p90", "p99", "max"))
                print(f"| {r['round']} | {kind} | {s['count']} | {cells} |")
    print()
    print("| measurement | value |")
    print("| --- | ---: |")
    for r in result["rounds"]:
        print(f"| round {r['round']}: calls, errors | {r['calls']}, {r['errors']} |")
        print(f"| round {r['round']}: seconds, calls/s | {r['seconds']:.1f}, {r['calls_per_s']:.0f} |")
    print(f"| server RSS before, MiB | {result['rss_mib']['before']:.1f} |")
    for k, v in enumerate(result["rss_mib"]["after"], 1):
        print(f"| server RSS after round {k}, MiB | {v:.1f} |")
    print(f"| RSS growth after round 1, MiB | {result['growth_after_round1_mib']:+.1f} |")
    if "graph_cache_bytes" in result:
        print(f"| graphs registered, bytes (cache limit) | {result['graphs_registered']}, {result['graph_cache_bytes']} "
              f"({result['cache_limit_bytes'] // MiB} MiB) |")
    print(f"| errors in all rounds | {result['errors']} |")


if __name__ == "__main__":
    sys.exit(main())
