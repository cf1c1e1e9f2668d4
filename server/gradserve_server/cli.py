"""The `gradserve` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

import gradserve as gs
from gradserve_engine.errors import StoreError

from .app import Config, MiB, Server


def demo() -> int:
    """The seed's example end to end: trace z = x*y + sin(x), print the graph and its gradients."""
    def f(x, y):
        return x * y + gs.sin(x)

    print(gs.trace(f, 2.0, 3.0))
    gx, gy = gs.grad(f, argnums=(0, 1))(2.0, 3.0)
    print(f"z = {f(np.float64(2.0), 3.0):.6f}")
    print(f"dz/dx = y + cos(x) = {gx:.6f}   (expected {3.0 + np.cos(2.0):.6f})")
    print(f"dz/dy = x          = {gy:.6f}   (expected 2.000000)")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Start the gRPC service and block until SIGTERM/SIGINT, then drain."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        server = Server(config).start()
    except StoreError as e:
        raise SystemExit(f"gradserve: {e}") from None
    server.stop_on_signals()
    extra = f", metrics on {config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    print(f"gradserve listening on {config.host}:{server.port}{extra}", flush=True)
    server.wait_for_signal()
    # a call or job step that ignores its cancellation must not hold the process past --grace
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def config_from_args(args: argparse.Namespace) -> Config:
    """The server's Config from `gradserve serve`'s flags (sizes are given in MiB, kept in bytes)."""
    token = None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
        if not token:
            raise SystemExit(f"token file {args.token_file} is empty")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.reflection_needs_token and token is None:
        raise SystemExit("--reflection-needs-token needs --token-file")
    return Config(host=args.host, port=args.port, max_message_bytes=args.max_message_mib * MiB,
                  max_call_bytes=args.max_call_mib * MiB, max_inflight_bytes=args.max_inflight_mib * MiB,
                  cache_bytes=args.cache_mib * MiB, plan_cache_bytes=args.plan_cache_mib * MiB,
                  residual_bytes=args.residual_mib * MiB, residual_ttl=args.residual_ttl,
                  residual_sessions=args.residual_sessions, tensor_store_bytes=args.tensor_store_mib * MiB,
                  tensor_ttl=args.tensor_ttl, store=args.store, token=token, tls_cert=args.tls_cert,
                  tls_key=args.tls_key, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                  reflection_needs_token=args.reflection_needs_token, max_concurrent=args.max_concurrent,
                  threads=args.threads, max_watchers=args.max_watchers,
                  max_health_watchers=args.max_health_watchers, grace=args.grace, ray=args.ray,
                  ray_address=args.ray_address, workers=args.workers, worker_cpus=args.worker_cpus,
                  job_runners=args.job_runners, checkpoint_every=args.checkpoint_every,
                  checkpoint_seconds=args.checkpoint_seconds, job_history=args.job_history,
                  lease_seconds=args.lease_seconds, store_busy_seconds=args.store_busy_seconds, kernels=args.kernels)


def jobs(args: argparse.Namespace) -> int:
    """`gradserve jobs list|show ID|cancel ID`: look at and steer a server's optimisation jobs."""
    import datetime

    token = args.token_file.read_text().strip() if args.token_file else None
    with gs.connect(args.address, token=token, tls=args.tls_ca or None, timeout=args.timeout) as remote:
        try:
            if args.action == "list":
                print(f"{'id':16}  {'status':10} {'step':>12}  {'loss':>12}  name")
                for j in remote.job_summaries():  # page by page, as the server sends them
                    print(f"{j.job_id:16}  {j.status:10} {j.step:>5}/{j.steps:<6}  {j.loss:>12.6g}  {j.name}")
                return 0
            if args.job_id is None:
                raise SystemExit(f"gradserve jobs {args.action} needs a job id")
            job = remote.job(args.job_id)
            if args.action == "cancel":
                job.cancel()
            j = job.info()
            when = datetime.datetime.fromtimestamp(j.created, datetime.UTC).isoformat(timespec="seconds")
            print(f"job {j.job_id} {j.name!r}\n  status    {j.status}  {j.message}\n  step      {j.step} of {j.steps} "
                  f"(checkpoint at {j.checkpoint_step})\n  loss      {j.loss:.6g}  (gradient norm {j.grad_norm:.3g})\n"
                  f"  optimizer {j.optimizer_json}\n  graph     {j.graph_id}\n  created   {when}")
            return 0
        except gs.RemoteError as e:
            raise SystemExit(f"gradserve jobs: {e.code.name}: {e}") from None


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    """`gradserve serve`'s flags. Every default is Config's (`config_from_args` of no flags is Config())."""
    d = Config()
    s.add_argument("--host", default=d.host, help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=d.port, help="port (default %(default)s; 0 picks a free one and prints it)")
    s.add_argument("--max-message-mib", type=int, default=d.max_message_bytes // MiB,
                   help="largest request or response (default %(default)s)")
    s.add_argument("--max-call-mib", type=int, default=d.max_call_bytes // MiB,
                   help="memory one computation may hold at its peak; larger ones get RESOURCE_EXHAUSTED before they "
                        "run (default %(default)s)")
    s.add_argument("--max-inflight-mib", type=int, default=d.max_inflight_bytes // MiB,
                   help="memory the computations running at once may hold together; one that would go over gets "
                        "RESOURCE_EXHAUSTED, to retry later (default %(default)s)")
    s.add_argument("--cache-mib", type=int, default=d.cache_bytes // MiB,
                   help="graphs kept in memory, LRU by bytes (default %(default)s)")
    s.add_argument("--plan-cache-mib", type=int, default=d.plan_cache_bytes // MiB,
                   help="plans, derived graphs and analyses the engine keeps between calls, LRU by their estimated "
                        "bytes (default %(default)s)")
    s.add_argument("--residual-mib", type=int, default=d.residual_bytes // MiB,
                   help="forward values kept by vjp sessions (default %(default)s)")
    s.add_argument("--residual-ttl", type=float, default=d.residual_ttl,
                   help="seconds an unused vjp session is kept (default %(default)s)")
    s.add_argument("--residual-sessions", type=int, default=d.residual_sessions,
                   help="vjp sessions kept open at once; opening one more releases the least recently used "
                        "(default %(default)s)")
    s.add_argument("--tensor-store-mib", type=int, default=d.tensor_store_bytes // MiB,
                   help="tensors uploaded with PutTensor or kept by keep=True calls, LRU by bytes (default %(default)s)")
    s.add_argument("--tensor-ttl", type=float, default=d.tensor_ttl,
                   help="seconds a stored tensor nobody uses (and no job or vjp session pins) is kept "
                        "(default %(default)s)")
    s.add_argument("--store", type=Path, default=d.store, help="directory where registered graphs survive restarts")
    s.add_argument("--token-file", type=Path, default=None,  # no file: Config's token None
                   help="file holding the bearer token clients must send")
    s.add_argument("--tls-cert", type=Path, default=d.tls_cert, help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", type=Path, default=d.tls_key, help="PEM private key")
    s.add_argument("--metrics-port", type=int, default=d.metrics_port, help="serve Prometheus metrics on this port (0: any)")
    s.add_argument("--metrics-host", default=d.metrics_host,
                   help="address the metrics port binds (default %(default)s: this machine only; /metrics has no auth)")
    s.add_argument("--reflection-needs-token", action="store_true", default=d.reflection_needs_token,
                   help="server reflection answers only calls with the token (health stays open for probes)")
    s.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help="calls served at once; more get RESOURCE_EXHAUSTED (default %(default)s)")
    s.add_argument("--threads", type=int, default=d.threads, help="server threads (default %(default)s)")
    s.add_argument("--max-watchers", type=int, default=d.max_watchers,
                   help="calls waiting on jobs at once (WatchJob streams, cancels), on threads of their own; more "
                        "watchers get RESOURCE_EXHAUSTED (default %(default)s)")
    s.add_argument("--max-health-watchers", type=int, default=d.max_health_watchers,
                   help="health Watch streams open at once (they hold no thread); more get RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    s.add_argument("--grace", type=float, default=d.grace, help="seconds calls in flight get at shutdown (default %(default)s)")
    s.add_argument("--ray", action="store_true", default=d.ray,
                   help="start a local Ray and spread large work over its workers")
    s.add_argument("--ray-address", default=d.ray_address, help="join an existing Ray cluster (e.g. 127.0.0.1:6379)")
    s.add_argument("--workers", type=int, default=d.workers, help="worker actors (default: the cluster's CPUs)")
    s.add_argument("--worker-cpus", type=float, default=d.worker_cpus,
                   help="CPUs (and BLAS threads) per worker (default %(default)s)")
    s.add_argument("--job-runners", type=int, default=d.job_runners,
                   help="threads that take turns running optimisation jobs (default %(default)s)")
    s.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="job steps between checkpoints (default %(default)s)")
    s.add_argument("--checkpoint-seconds", type=float, default=d.checkpoint_seconds,
                   help="and at most this long between them (default %(default)s)")
    s.add_argument("--job-history", type=int, default=d.job_history,
                   help="progress points kept per job: every step up to this many, then every 2nd, 4th, ... step "
                        "(default %(default)s)")
    s.add_argument("--lease-seconds", type=float, default=d.lease_seconds,
                   help="term of the job lease of a --store shared by several servers: one runs the jobs, the others "
                        "take over when it lapses (default %(default)s)")
    s.add_argument("--store-busy-seconds", type=float, default=d.store_busy_seconds,
                   help="longest a job store write waits for a lock another process holds (default %(default)s)")
    s.add_argument("--kernels", default=d.kernels, choices=["numpy", "native", "auto", "gpu"],
                   help="numpy kernels, fused numba kernels (the native extra), auto (native where it wins), or CuPy "
                        "(default %(default)s)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    parser = argparse.ArgumentParser(prog="gradserve", description="Distributed gradient computation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the seed's z = x*y + sin(x) example end to end")
    add_serve_flags(sub.add_parser("serve", help="run the gRPC gradient service"))
    j = sub.add_parser("jobs", help="list, show or cancel a server's optimisation jobs")
    j.add_argument("action", choices=["list", "show", "cancel"])
    j.add_argument("job_id", nargs="?")
    j.add_argument("--address", default=f"{d.host}:{d.port}", help="the server (host:port; default %(default)s)")
    j.add_argument("--token-file", type=Path, default=None)
    j.add_argument("--tls-ca", type=Path, default=None, help="CA certificate of a TLS server")
    j.add_argument("--timeout", type=float, default=30.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return demo()
    if args.command == "jobs":
        return jobs(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
