"""The `gradserve` command line: `serve` runs the service (each flag also settable from a
`GRADSERVE_<FLAG>` environment variable), `jobs` and `graphs` look at and steer a running server.

Mistakes (a bad flag or environment value, a missing or unreadable file, a server that answers
an error) end the command with one line on stderr naming what is wrong, and a non-zero status."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import math
import os
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import grpc
import numpy as np

import gradserve as gs
from gradserve_engine.errors import GradserveError
from gradserve_engine.ir import type_str
from gradserve_engine.wire import DTYPE_FROM_PB

from .app import Config, MiB, Server
from .processes import TAG_VAR, Supervisor

log = logging.getLogger("gradserve_server")
ENV_PREFIX = "GRADSERVE_"  # GRADSERVE_<FLAG>: --max-call-mib is GRADSERVE_MAX_CALL_MIB
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # a switch's values in the environment
FINISHED = ("succeeded", "failed", "cancelled")


def version() -> str:
    """The installed distribution's version (package metadata)."""
    try:
        return importlib.metadata.version("gradserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


# ---------------------------------------------------------------- values of flags, checked as they are parsed


def _integer(minimum: int, maximum: int | None = None, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what or 'it'} must be {span}")
        return value

    parse.__name__ = "integer"
    return parse


def _number(positive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be a finite number "
                                             f"{'above 0' if positive else 'of 0 or more'}")
        return value

    parse.__name__ = "number"
    return parse


PORT = _integer(0, 65535, "a port")
COUNT = _integer(0)
AT_LEAST_ONE = _integer(1)
SECONDS = _number()
POSITIVE = _number(positive=True)


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line (the usage is what --help is for)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help states every flag's default ("none" where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not action.option_strings:  # a positional argument has no default to state
            return action.help
        if action.default is None and action.help and "%(default)" not in action.help:
            return action.help + " (default: none)"
        return super()._get_help_string(action)


# ---------------------------------------------------------------- serve


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


def serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start the gRPC service and block until SIGTERM/SIGINT, then drain. With --processes N (in
    the parent: not in one of its processes), start N servers on the port and watch them."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if config.processes > 1 and not config.process_tag:
        try:
            supervisor = Supervisor(config, argv).start()
        except (OSError, ValueError, RuntimeError) as e:
            raise SystemExit(f"gradserve: cannot start: {e}") from None
        extra = f", metrics on {config.metrics_host}:{supervisor.metrics_port}/metrics" if supervisor.metrics_port else ""
        print(f"gradserve listening on {config.host}:{supervisor.port}{extra} ({config.processes} processes)", flush=True)
        return supervisor.wait_for_signal()
    try:
        server = Server(config).start()
    except (GradserveError, OSError, ValueError, ImportError) as e:  # the configuration's, not a bug: one line
        log.debug("the server did not start", exc_info=True)
        raise SystemExit(f"gradserve: cannot start: {e}") from None
    server.stop_on_signals()
    extra = f", metrics on {config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    print(f"gradserve listening on {config.host}:{server.port}{extra}", flush=True)
    server.wait_for_signal()
    # a call or job step that ignores its cancellation must not hold the process past --grace
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _read(path: Path, flag: str) -> bytes:
    """A file a flag names, or a one-line exit saying why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise SystemExit(f"gradserve: {flag} {path}: {e.strerror or e}") from None


def _token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = _read(path, "--token-file").decode(errors="replace").strip()
    if not token:
        raise SystemExit(f"gradserve: --token-file {path} is empty")
    return token


def _check_tls(cert: Path, key: Path) -> None:
    """The certificate chain and key load as a TLS server's (else a one-line exit: grpc would only log it)."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        _read(path, flag)
    try:  # a key behind a passphrase is refused (the server could not use it), never prompted for
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        raise SystemExit(f"gradserve: --tls-cert {cert} and --tls-key {key} are not a PEM certificate chain and its "
                         f"unencrypted private key ({e.reason or e})") from None


def config_from_args(args: argparse.Namespace) -> Config:
    """The server's Config from `gradserve serve`'s flags (sizes are given in MiB, kept in bytes).
    The files they name are checked here: a missing or unreadable one ends the command in one line."""
    token = _token(args.token_file)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("gradserve: --tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        _check_tls(args.tls_cert, args.tls_key)
    if args.store is not None and args.store.exists() and not args.store.is_dir():
        raise SystemExit(f"gradserve: --store {args.store} is not a directory")
    if args.reflection_needs_token and token is None:
        raise SystemExit("gradserve: --reflection-needs-token needs --token-file")
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
                  job_retention_count=args.job_retention_count, job_retention_days=args.job_retention_days,
                  lease_seconds=args.lease_seconds, store_busy_seconds=args.store_busy_seconds, kernels=args.kernels,
                  processes=args.processes, process_tag=os.environ.get(TAG_VAR, ""))


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    """`gradserve serve`'s flags. Every default is Config's (`config_from_args` of no flags is Config())."""
    d = Config()
    s.add_argument("--host", default=d.host, help="address to bind (127.0.0.1: this machine only)")
    s.add_argument("--port", type=PORT, default=d.port, help="port (0 picks a free one and prints it)")
    s.add_argument("--max-message-mib", type=AT_LEAST_ONE, default=d.max_message_bytes // MiB,
                   help="largest request or response")
    s.add_argument("--max-call-mib", type=AT_LEAST_ONE, default=d.max_call_bytes // MiB,
                   help="memory one computation may hold at its peak; larger ones get RESOURCE_EXHAUSTED before they "
                        "run")
    s.add_argument("--max-inflight-mib", type=AT_LEAST_ONE, default=d.max_inflight_bytes // MiB,
                   help="memory the computations running at once may hold together; one that would go over gets "
                        "RESOURCE_EXHAUSTED, to retry later")
    s.add_argument("--cache-mib", type=COUNT, default=d.cache_bytes // MiB, help="graphs kept in memory, LRU by bytes")
    s.add_argument("--plan-cache-mib", type=COUNT, default=d.plan_cache_bytes // MiB,
                   help="plans, derived graphs and analyses the engine keeps between calls, LRU by their estimated bytes")
    s.add_argument("--residual-mib", type=COUNT, default=d.residual_bytes // MiB,
                   help="forward values kept by vjp sessions")
    s.add_argument("--residual-ttl", type=SECONDS, default=d.residual_ttl, help="seconds an unused vjp session is kept")
    s.add_argument("--residual-sessions", type=COUNT, default=d.residual_sessions,
                   help="vjp sessions kept open at once; opening one more releases the least recently used")
    s.add_argument("--tensor-store-mib", type=COUNT, default=d.tensor_store_bytes // MiB,
                   help="tensors uploaded with PutTensor or kept by keep=True calls, LRU by bytes")
    s.add_argument("--tensor-ttl", type=SECONDS, default=d.tensor_ttl,
                   help="seconds a stored tensor nobody uses (and no job or vjp session pins) is kept")
    s.add_argument("--store", type=Path, default=d.store,
                   help="directory where registered graphs and jobs survive restarts (none: in memory)")
    s.add_argument("--token-file", type=Path, default=None,  # no file: Config's token None
                   help="file holding the bearer token clients must send")
    s.add_argument("--tls-cert", type=Path, default=d.tls_cert, help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", type=Path, default=d.tls_key, help="PEM private key")
    s.add_argument("--metrics-port", type=PORT, default=d.metrics_port,
                   help="serve Prometheus metrics on this port (0: any; none: no metrics)")
    s.add_argument("--metrics-host", default=d.metrics_host,
                   help="address the metrics port binds (127.0.0.1: this machine only; /metrics has no auth)")
    s.add_argument("--reflection-needs-token", action=argparse.BooleanOptionalAction, default=d.reflection_needs_token,
                   help="server reflection answers only calls with the token (health stays open for probes)")
    s.add_argument("--max-concurrent", type=AT_LEAST_ONE, default=d.max_concurrent,
                   help="calls served at once; more get RESOURCE_EXHAUSTED")
    s.add_argument("--threads", type=AT_LEAST_ONE, default=d.threads, help="server threads")
    s.add_argument("--max-watchers", type=COUNT, default=d.max_watchers,
                   help="calls waiting on jobs at once (WatchJob streams, cancels), on threads of their own; more "
                        "watchers get RESOURCE_EXHAUSTED")
    s.add_argument("--max-health-watchers", type=COUNT, default=d.max_health_watchers,
                   help="health Watch streams open at once (they hold no thread); more get RESOURCE_EXHAUSTED")
    s.add_argument("--grace", type=SECONDS, default=d.grace, help="seconds calls in flight get at shutdown")
    s.add_argument("--ray", action=argparse.BooleanOptionalAction, default=d.ray,
                   help="start a local Ray and spread large work over its workers")
    s.add_argument("--ray-address", default=d.ray_address, help="join an existing Ray cluster (e.g. 127.0.0.1:6379)")
    s.add_argument("--workers", type=AT_LEAST_ONE, default=d.workers, help="worker actors (none: the cluster's CPUs)")
    s.add_argument("--worker-cpus", type=POSITIVE, default=d.worker_cpus, help="CPUs (and BLAS threads) per worker")
    s.add_argument("--job-runners", type=AT_LEAST_ONE, default=d.job_runners,
                   help="threads that take turns running optimisation jobs")
    s.add_argument("--checkpoint-every", type=AT_LEAST_ONE, default=d.checkpoint_every,
                   help="job steps between checkpoints")
    s.add_argument("--checkpoint-seconds", type=POSITIVE, default=d.checkpoint_seconds,
                   help="and at most this long between them")
    s.add_argument("--job-history", type=_integer(2), default=d.job_history,
                   help="progress points kept per job: every step up to this many, then every 2nd, 4th, ... step")
    s.add_argument("--job-retention-count", type=COUNT, default=d.job_retention_count,
                   help="finished jobs kept (the newest); older ones are deleted, with their history and checkpoints, "
                        "at start and every minute (0: no bound)")
    s.add_argument("--job-retention-days", type=SECONDS, default=d.job_retention_days,
                   help="finished jobs older than this many days are deleted, likewise (0: no bound)")
    s.add_argument("--lease-seconds", type=POSITIVE, default=d.lease_seconds,
                   help="term of the job lease of a --store shared by several servers: one runs the jobs, the others "
                        "take over when it lapses")
    s.add_argument("--store-busy-seconds", type=POSITIVE, default=d.store_busy_seconds,
                   help="longest a job store write waits for a lock another process holds")
    s.add_argument("--processes", type=AT_LEAST_ONE, default=d.processes,
                   help="server processes sharing the port (SO_REUSEPORT), so that calls use more than one core; they "
                        "share --store (or a temporary one), each keeps its own tensors and vjp sessions")
    s.add_argument("--kernels", default=d.kernels, choices=["numpy", "native", "auto", "gpu"],
                   help="numpy kernels, fused numba kernels (the native extra), auto (native where it wins), or CuPy")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="what is logged")


def env_name(action: argparse.Action) -> str:
    """The environment variable of a flag: --max-call-mib is GRADSERVE_MAX_CALL_MIB."""
    return env_name_of(action.option_strings[0])


def env_name_of(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Take the defaults of `parser`'s flags from their GRADSERVE_<FLAG> variables where set (an
    empty one counts as unset), so a flag given on the command line still wins. A value the flag
    would refuse ends the command, naming the variable."""
    for action in parser._actions:
        if not action.option_strings or action.default == argparse.SUPPRESS:
            continue  # --help
        name = env_name(action)
        text = environ.get(name, "")
        if not text:
            continue
        if action.nargs == 0:  # a switch
            if text.lower() not in TRUE + FALSE:
                parser.error(f"environment variable {name}={text!r}: a switch is one of {', '.join(TRUE + FALSE)}")
            action.default = text.lower() in TRUE
            continue
        try:
            value = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            parser.error(f"environment variable {name}={text!r}: {e}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"environment variable {name}={text!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value


# ---------------------------------------------------------------- jobs and graphs of a running server


def _connect(args: argparse.Namespace) -> gs.Session:
    token = _token(args.token_file)
    ca = _read(args.tls_ca, "--tls-ca") if args.tls_ca is not None else None
    return gs.connect(args.address, token=token, tls=ca, timeout=args.timeout)


def _table(header: str, rows: Iterator[str]) -> None:
    """Print rows under a header, the header once the server has answered (an error prints alone)."""
    first = next(rows, None)
    print(header)
    if first is not None:
        print(first)
    for row in rows:
        print(row)


def _fail(command: str, message: str) -> int:
    print(f"gradserve {command}: {message}", file=sys.stderr)
    return 1


def jobs(args: argparse.Namespace) -> int:
    """`gradserve jobs list|show ID|cancel ID|delete ID`: look at and steer a server's optimisation jobs."""
    if args.action != "list" and args.id is None:
        return _fail("jobs", f"{args.action} needs a job id")
    with _connect(args) as remote:
        try:
            if args.action == "list":  # one ListJobs call per page: the summaries hold all that is printed
                _table(f"{'id':16}  {'status':10} {'step':>12}  {'loss':>12}  name", (
                    f"{j.job_id:16}  {j.status:10} {j.step:>5}/{j.steps:<6}  {j.loss:>12.6g}  {j.name}"
                    for j in remote.job_summaries()))
                return 0
            if args.action == "delete":
                if not remote.delete_job(args.id):
                    return _fail("jobs", f"there is no job {args.id}")
                print(f"job {args.id} deleted")
                return 0
            job = remote.job(args.id)
            if args.action == "cancel":
                before = job.info().status
                if before in FINISHED:
                    return _fail("jobs", f"job {args.id} has already finished ({before}): there is nothing to cancel")
                job.cancel()
            j = job.info()
            when = datetime.datetime.fromtimestamp(j.created, datetime.UTC).isoformat(timespec="seconds")
            print(f"job {j.job_id} {j.name!r}\n  status    {j.status}  {j.message}\n  step      {j.step} of {j.steps} "
                  f"(checkpoint at {j.checkpoint_step})\n  loss      {j.loss:.6g}  (gradient norm {j.grad_norm:.3g})\n"
                  f"  optimizer {j.optimizer_json}\n  graph     {j.graph_id}\n  created   {when}")
            if args.action == "cancel" and j.status in ("succeeded", "failed"):
                return _fail("jobs", f"job {args.id} finished ({j.status}) before the cancel reached it")
            return 0
        except gs.RemoteError as e:
            hint = f" (gradserve jobs cancel {args.id})" if e.code == grpc.StatusCode.FAILED_PRECONDITION else ""
            return _fail("jobs", f"{e.code.name}: {e}{hint}")


def graphs(args: argparse.Namespace) -> int:
    """`gradserve graphs list|show ID|delete ID`: the graphs a server holds registered."""
    if args.action != "list" and args.id is None:
        return _fail("graphs", f"{args.action} needs a graph id")
    with _connect(args) as remote:
        try:
            if args.action == "list":
                _table(f"{'id':64}  {'nodes':>7} {'inputs':>6} {'outputs':>7} {'bytes':>10}", (
                    f"{g.graph_id:64}  {g.nodes:>7} {g.input_count:>6} {g.output_count:>7} {g.bytes:>10}"
                    for g in remote.graphs()))
                return 0
            if args.action == "delete":
                if not remote.delete(args.id):
                    return _fail("graphs", f"there is no graph {args.id}")
                print(f"graph {args.id} deleted")
                return 0
            found = remote.graph(args.id)
            info = found.info
            lines = [f"graph {info.graph_id}", f"  nodes     {info.nodes}", f"  bytes     {info.bytes}",
                     f"  inputs    {info.input_count}"]
            lines += [f"    {v.name}  {type_str(DTYPE_FROM_PB[v.dtype], tuple(v.shape))}" for v in found.inputs]
            lines.append(f"  outputs   {info.output_count}")
            lines += [f"    {v.name}  {type_str(DTYPE_FROM_PB[v.dtype], tuple(v.shape))}" for v in found.outputs]
            print("\n".join(lines))
            return 0
        except gs.RemoteError as e:
            return _fail("graphs", f"{e.code.name}: {e}")


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """How `jobs` and `graphs` reach the server."""
    d = Config()
    p.add_argument("--address", default=f"{d.host}:{d.port}", help="the server (host:port)")
    token_file = os.environ.get(env_name_of("--token-file")) or None  # as serve's: one variable for a container
    p.add_argument("--token-file", type=Path, default=Path(token_file) if token_file else None,
                   help="file holding the server's bearer token (or GRADSERVE_TOKEN_FILE)")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate of a TLS server (none: plaintext)")
    p.add_argument("--timeout", type=POSITIVE, default=30.0, help="seconds each call may take")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; with `environ`, `serve`'s flag defaults come from its GRADSERVE_<FLAG> variables."""
    parser = _Parser(prog="gradserve", description="Distributed gradient computation.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the seed's z = x*y + sin(x) example end to end", formatter_class=_Help)
    s = sub.add_parser("serve", help="run the gRPC gradient service", formatter_class=_Help,
                       description="Run the gRPC gradient service. Every flag may also be set by an environment "
                                   "variable GRADSERVE_<FLAG> (--max-call-mib: GRADSERVE_MAX_CALL_MIB; a switch takes "
                                   "1/0, true/false, yes/no or on/off); a flag on the command line wins.")
    add_serve_flags(s)
    if environ is not None:
        apply_environment(s, environ)
    j = sub.add_parser("jobs", help="list, show, cancel or delete a server's optimisation jobs", formatter_class=_Help)
    j.add_argument("action", choices=["list", "show", "cancel", "delete"], help="what to do")
    j.add_argument("id", nargs="?", metavar="JOB_ID", help="the job (all but list)")
    add_client_flags(j)
    g = sub.add_parser("graphs", help="list, show or delete a server's registered graphs", formatter_class=_Help)
    g.add_argument("action", choices=["list", "show", "delete"], help="what to do")
    g.add_argument("id", nargs="?", metavar="GRAPH_ID", help="the graph (all but list)")
    add_client_flags(g)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":  # parsed again with the environment's defaults: a serve-only concern
        args = build_parser(os.environ).parse_args(argv)
        return serve(args, argv if argv is not None else sys.argv[1:])
    if args.command == "demo":
        return demo()
    return jobs(args) if args.command == "jobs" else graphs(args)


if __name__ == "__main__":
    sys.exit(main())
