#!/usr/bin/env python
"""A remote optimisation job vs the same loop run locally: 200 Adam steps on the MLP.

    python bench/jobs.py                              # float64 and float32, under a minute on 2 quiet cores
    python bench/jobs.py --dtype float64 --steps 200 --store --json out.json
    python bench/jobs.py --smoke                      # the same at a tiny MLP and 3 steps, seconds (run by the tests)

The MLP of bench/mlp.py (batch 256, 784 -> 1024 -> 1024 -> 10, tanh, softmax cross-entropy, the same
seeded data and Glorot weights), minimised with `optim.Adam(lr=1e-3)` for --steps full-batch steps:

- remote: `remote.minimize(loss, params, args=(x, y), optimizer=..., steps=...)` against a
  `python -m gradserve_server` child on 127.0.0.1 (default flags; --store adds a store on disk), then
  `job.wait()` (following the WatchJob stream: one small progress event per step) and `job.result()`
  (the final parameters come back once). Timed from before the submit (tracing, sending params and
  data) to the parameters in hand.
- local: `gs.minimize(loss, params, args=(x, y), optimizer=..., steps=...)` in this process.

One run each, remote first, on a fresh server; the local engine and the server's have not seen the
graph before, so both include their one-off tracing and plan compilation. Both sides use
--blas-threads BLAS threads (default 1: on a shared 2-core machine a 2-thread OpenBLAS spin-waits
whenever another process holds a core, and one run then measures the neighbours; 0 keeps what the
environment gives). Both runs must reach the same parameters (the same deterministic loop on the same
engine); the table shows the largest difference. The CPU seconds of the server and of this process are
shown too: unlike the wall times they hardly move when other processes share the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlp import MLP_SHAPE, SMOKE_SHAPE, ForeignLoad, make_problem, shape_text  # the MLP exactly as bench/mlp.py builds it

import gradserve as gs
from gradserve import optim


def mlp_loss(params, x, y):
    h = gs.tanh(x @ params["w1"] + params["b1"])
    h = gs.tanh(h @ params["w2"] + params["b2"])
    return gs.cross_entropy(h @ params["w3"] + params["b3"], y)


# ---------------------------------------------------------------- the server and the machine


def start_server(blas_threads: int | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = os.environ.copy()
    if blas_threads is not None:
        env.update({k: str(blas_threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    proc = subprocess.Popen([sys.executable, "-m", "gradserve_server", "--host", "127.0.0.1", "--port", "0",
                             "--log-level", "warning", *extra], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split("listening on ")[1].split(",")[0].strip()


def blas_limits(threads: int | None) -> contextlib.AbstractContextManager:
    """This process's BLAS threads for the local run, as the server's environment sets them."""
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(threads)


def _proc_stat(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, minor page faults) of a live process; zeros when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])
    except (OSError, ValueError, IndexError):
        return 0.0, 0


class Load:
    """CPU seconds used by this process, by the server, and by every other process, over a span."""

    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.t0, self.busy0, self.own0, self.srv0 = time.perf_counter(), ForeignLoad._busy(), self._own(), _proc_stat(server_pid)

    @staticmethod
    def _own() -> tuple[float, int]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime, ru.ru_minflt

    def done(self) -> dict[str, float | None]:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        own, srv, busy = self._own(), _proc_stat(self.pid), ForeignLoad._busy()
        own_cpu, srv_cpu = own[0] - self.own0[0], srv[0] - self.srv0[0]
        other = None if busy is None or self.busy0 is None else max(0.0, (busy - self.busy0) - own_cpu - srv_cpu) / wall
        return {"wall_s": wall, "client_cpu_s": own_cpu, "server_cpu_s": srv_cpu, "other_cores": other,
                "client_minor_faults": own[1] - self.own0[1], "server_minor_faults": srv[1] - self.srv0[1]}


# ---------------------------------------------------------------- the runs


def run_remote(remote: gs.Session, server_pid: int, params: dict, x: np.ndarray, y: np.ndarray, steps: int,
               lr: float) -> dict[str, Any]:
    load = Load(server_pid)
    t0 = time.perf_counter()
    job = remote.minimize(mlp_loss, params, args=(x, y), optimizer=optim.Adam(lr=lr), steps=steps, name="bench")
    t_submit = time.perf_counter()
    job.wait()
    t_wait = time.perf_counter()
    res = job.result()
    t_end = time.perf_counter()
    info = job.info()
    return {"result": res, "total_s": t_end - t0, "submit_s": t_submit - t0, "wait_s": t_wait - t_submit,
            "fetch_s": t_end - t_wait, "server_job_s": info.updated - info.created, "status": info.status,
            "load": load.done()}


def run_local(server_pid: int, params: dict, x: np.ndarray, y: np.ndarray, steps: int,
              lr: float) -> dict[str, Any]:
    load = Load(server_pid)
    t0 = time.perf_counter()
    res = gs.minimize(mlp_loss, params, args=(x, y), optimizer=optim.Adam(lr=lr), steps=steps)
    return {"result": res, "total_s": time.perf_counter() - t0, "load": load.done()}


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


# ---------------------------------------------------------------- report


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    head = ["dtype", "steps", "remote s", "local s", "remote / local", "remote ms/step", "local ms/step",
            "remote: submit / run / fetch s", "server-side job s", "CPU s: remote (server + client) / local", "CPU ratio",
            "max |Δparams|", "|Δloss|", "other processes, cores"]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for dt, r in results["runs"].items():
        n = r["steps"]
        other = [v for v in (r["remote"]["load"]["other_cores"], r["local"]["load"]["other_cores"]) if v is not None]
        rows.append([dt, str(n), fmt(r["remote"]["total_s"]), fmt(r["local"]["total_s"]), f"{r['ratio']:.3f}",
                     fmt(1e3 * r["remote"]["total_s"] / n, 1), fmt(1e3 * r["local"]["total_s"] / n, 1),
                     f"{r['remote']['submit_s']:.2f} / {r['remote']['wait_s']:.2f} / {r['remote']['fetch_s']:.2f}",
                     fmt(r["remote"]["server_job_s"]),
                     f"{r['cpu_remote_s']:.2f} / {r['cpu_local_s']:.2f}", f"{r['cpu_ratio']:.3f}",
                     f"{r['max_param_diff']:.1e}", f"{r['loss_diff']:.1e}",
                     fmt(max(other), 2) if other else "—"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="Adam steps (default 200)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads for both sides (the server's environment, threadpoolctl here); default 1, "
                         "0: whatever the environment gives")
    ap.add_argument("--store", action="store_true", help="run the server with --store (a temporary directory): "
                                                          "the job's progress and checkpoints go to disk")
    ap.add_argument("--server-args", default="", help="more flags for the server, e.g. '--checkpoint-every 1000'")
    ap.add_argument("--budget", type=float, default=105.0,
                    help="seconds: a later dtype is skipped when the runs so far say it would not fit (default 105)")
    ap.add_argument("--json", metavar="PATH", help="also write every number (and the environment) here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"{shape_text(SMOKE_SHAPE)} and 3 steps: the same code in seconds, for the tests "
                         "(the numbers mean nothing; options given explicitly still apply)")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(steps=3)
    args = ap.parse_args(argv)
    shape = SMOKE_SHAPE if args.smoke else MLP_SHAPE
    if args.blas_threads == 0:
        args.blas_threads = None

    blas = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}
    if args.blas_threads is not None:
        blas["threads (--blas-threads)"] = str(args.blas_threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"numpy {np.__version__}; BLAS environment (shared with the server): {blas or 'none set'}")
    store = tempfile.TemporaryDirectory(prefix="gradserve-bench-store-") if args.store else None
    extra = shlex.split(args.server_args) + (["--store", store.name] if store is not None else [])
    print(f"# {'smoke run, the numbers mean nothing: ' if args.smoke else ''}MLP {shape_text(shape)}, "
          "tanh, softmax cross-entropy; "
          f"Adam(lr={args.lr:g}), {args.steps} full-batch steps; one run each, remote first; "
          f"server flags: {' '.join(extra) or 'defaults (no --store)'}")
    server, address = start_server(args.blas_threads, extra)
    results: dict[str, Any] = {"steps": args.steps, "lr": args.lr, "address": address, "environment": blas, "runs": {},
                               "skipped": [], "server_args": extra, "blas_threads": args.blas_threads}
    start, last = time.perf_counter(), 0.0
    try:
        with gs.connect(address, timeout=600) as remote:
            for dt in args.dtype:
                if last and time.perf_counter() - start + last * (0.6 if dt == "float32" else 1.0) > args.budget:
                    print(f"# {dt}: skipped, it would not fit in --budget {args.budget:g} s (the last dtype took {last:.0f} s)")
                    results["skipped"].append(dt)
                    continue
                params, x, y = make_problem(dt, shape)
                r = run_remote(remote, server.pid, params, x, y, args.steps, args.lr)
                with blas_limits(args.blas_threads):
                    loc = run_local(server.pid, params, x, y, args.steps, args.lr)
                rres, lres = r.pop("result"), loc.pop("result")
                if not (r["status"] == "succeeded" and rres.nit == lres.nit == args.steps and lres.success):
                    raise SystemExit(f"{dt}: the runs did not both finish {args.steps} steps: remote {r['status']} "
                                     f"{rres.nit} ({rres.message}), local {lres.nit} ({lres.message})")
                results["runs"][dt] = {
                    "steps": args.steps, "remote": r, "local": loc, "ratio": r["total_s"] / loc["total_s"],
                    "cpu_remote_s": r["load"]["server_cpu_s"] + r["load"]["client_cpu_s"],
                    "cpu_local_s": loc["load"]["server_cpu_s"] + loc["load"]["client_cpu_s"],
                    "max_param_diff": max_diff(rres.x, lres.x), "loss_diff": abs(rres.fun - lres.fun),
                    "final_loss": lres.fun, "param_mib": sum(v.nbytes for v in params.values()) / 2**20,
                }
                results["runs"][dt]["cpu_ratio"] = results["runs"][dt]["cpu_remote_s"] / results["runs"][dt]["cpu_local_s"]
                last = r["total_s"] + loc["total_s"]
                print(f"# {dt}: remote {r['total_s']:.2f} s, local {loc['total_s']:.2f} s, final loss {lres.fun:.3g}",
                      flush=True)
    finally:
        server.terminate()
        server.wait(30)
        if store is not None:
            store.cleanup()
    print()
    print(table(results))
    print()
    worst = max(r["ratio"] for r in results["runs"].values())
    worst_cpu = max(r["cpu_ratio"] for r in results["runs"].values())
    print(f"target: remote at most 1.1x local -> {'met' if worst <= 1.1 else 'NOT met'} (worst {worst:.3f}x wall, "
          f"{worst_cpu:.3f}x CPU)")
    other = [r[side]["load"]["other_cores"] for r in results["runs"].values() for side in ("remote", "local")]
    if any(v is not None and v > 0.1 for v in other):
        print(f"WARNING: other processes kept up to {max(v for v in other if v is not None):.2f} of {os.cpu_count()} cores "
              "busy meanwhile: the times (and less so their ratio) are noisy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
