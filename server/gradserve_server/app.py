"""Building and running the gRPC server: the service, health, reflection, auth, TLS, metrics,
graceful shutdown."""

from __future__ import annotations

import functools
import hmac
import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve_engine.backend import Backend
from gradserve_engine.engine import Engine
from gradserve_engine.ir import Limits
from gradserve_engine.pool import ROUTES, RayPool
from gradserve_engine.scheduler import MODES, DistributedEngine, Policy
from gradserve_engine.v1 import service_pb2

from . import heap
from .bounds import Slots
from .jobs import JobManager, JobStore
from .metrics import Metrics
from .registry import GraphRegistry, ResidualStore
from .servicer import SERVICE, Servicer
from .tensors import TensorStore

log = logging.getLogger("gradserve_server")
MiB = 1 << 20


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 256 * MiB
    max_call_bytes: int = 4096 * MiB  # one computation's peak memory (a plan's, from its liveness)
    max_inflight_bytes: int = 8192 * MiB  # the peaks of the computations running at once, together
    cache_bytes: int = 512 * MiB
    plan_cache_bytes: int = 1024 * MiB  # the engine's plans, derived graphs and analyses (estimated bytes, LRU)
    residual_bytes: int = 1024 * MiB
    residual_ttl: float = 300.0
    residual_sessions: int = 10_000  # open vjp sessions (the least recently used released past it)
    tensor_store_bytes: int = 1024 * MiB  # tensors uploaded with PutTensor or kept with keep=True (LRU)
    tensor_ttl: float = 3600.0  # seconds an unpinned stored tensor is kept unused
    store: Path | None = None
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # /metrics is open to whoever reaches it: this machine only, unless asked
    reflection_needs_token: bool = False  # server reflection answers only calls with the token
    max_concurrent: int = 64
    threads: int = 16
    max_watchers: int = 16  # calls that wait on jobs (WatchJob streams, cancels), on threads of their own
    max_health_watchers: int = 1024  # health Watch streams open at once (they hold no thread)
    grace: float = 10.0
    max_nodes: int = 100_000
    max_elements: int = 1 << 28
    max_job_name: int = 256  # characters of a job spec's name
    max_optimizer_json: int = 65_536  # characters of a job spec's optimizer_json
    ray: bool = False  # start a local Ray and spread work over its workers
    ray_address: str | None = None  # or join an existing cluster
    workers: int | None = None  # worker actors (default: the cluster's CPUs)
    worker_cpus: float = 1.0
    job_runners: int = 2
    kernels: str = "numpy"  # numpy, native (numba), auto, gpu (CuPy)
    checkpoint_every: int = 500  # steps
    checkpoint_seconds: float = 30.0
    job_history: int = 10_000  # progress points kept per job (then every 2nd, 4th, ... step)
    job_retention_count: int = 1000  # finished jobs kept, the newest (0: no bound); older ones are deleted
    job_retention_days: float = 0.0  # finished jobs older than this are deleted (0: no bound)
    lease_seconds: float = 15.0  # the term of the job lease of a shared --store
    store_busy_seconds: float = 5.0  # the longest a job store write waits for a lock held elsewhere
    processes: int = 1  # server processes sharing the port (SO_REUSEPORT); see processes.py
    process_tag: str = ""  # set in each of those processes: which one it is (residual session handles say it)


def start_pool(config: Config) -> tuple[RayPool | None, Policy]:
    """Ray and the worker pool the config asks for (None: everything in process)."""
    if not config.ray and config.ray_address is None:
        return None, Policy()
    import ray  # optional: the ray extra

    if config.ray_address is not None:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=config.workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cores = float(ray.cluster_resources().get("CPU", 1))
    size = config.workers or max(int(cores // config.worker_cpus), 1)
    pool = RayPool(size, cpus=config.worker_cpus, blas_threads=max(int(config.worker_cpus), 1), kernels=config.kernels,
                   plan_cache_bytes=config.plan_cache_bytes)
    log.info("%d Ray workers (%s CPUs each) over %.0f cluster CPUs", size, config.worker_cpus, cores)
    return pool, Policy(cluster_cores=min(size * config.worker_cpus, cores))


REFLECTION = f"/{reflection.SERVICE_NAME}/"


class _TokenAuth(grpc.ServerInterceptor):
    """Bearer-token auth for the gradient service (and reflection with `reflection`); health stays
    open (probes send no token). Refused calls are counted as UNAUTHENTICATED answers of their method."""

    def __init__(self, token: str, metrics: Metrics, reflection: bool = False):
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics
        self._prefixes = (f"/{SERVICE}/", REFLECTION) if reflection else (f"/{SERVICE}/",)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)  # reflection is a bidirectional stream

    def intercept_service(self, continuation, details):
        if not details.method.startswith(self._prefixes):
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        # the path is the caller's: only known methods become label values (no unbounded series)
        method = details.method.rsplit("/", 1)[-1] if details.method.startswith(f"/{SERVICE}/") else ""
        method = method if method in service_pb2.DESCRIPTOR.services_by_name["GradientService"].methods_by_name else "other"
        self._metrics.observe_request(method, grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
        return self._deny_stream if details.method.startswith(REFLECTION) else self._deny


class CappedHealth(health.HealthServicer):
    """grpc.health.v1 with at most `max_watchers` Watch streams open at once; more are refused
    RESOURCE_EXHAUSTED. A Watch stream holds no server thread (grpcio serves it by callbacks), but
    each one costs memory, and every status change is sent to all of them while Check waits."""

    def __init__(self, max_watchers: int):
        super().__init__()
        self.watchers = Slots(max_watchers)

    def Watch(self, request, context, send_response_callback=None):
        if not self.watchers.take():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server is at its limit of {self.watchers.limit} health Watch streams "
                          "(--max-health-watchers); retry later, or call Check")
        if not context.add_callback(self.watchers.give):  # given back when the stream ends, however it ends
            self.watchers.give()  # it has ended already
            return None
        return super().Watch(request, context, send_response_callback)


class Server:
    """A running gradserve: `start()`, then `wait()`; `stop()` drains gracefully. It computes
    through `engine` when given (then no worker pool starts), else through a DistributedEngine."""

    def __init__(self, config: Config, engine: Backend | None = None):
        self.config = config
        if config.reflection_needs_token and not config.token:
            raise ValueError("reflection_needs_token needs a token (--token-file)")
        heap.keep_freed_buffers()
        self.metrics = Metrics()
        self.pool, policy = (None, Policy()) if engine is not None else start_pool(config)
        self.engine: Backend = engine or DistributedEngine(
            Engine(kernels=config.kernels, max_cache_bytes=config.plan_cache_bytes), self.pool, policy)
        limits = Limits(max_nodes=config.max_nodes, max_elements=config.max_elements,
                        max_constant_bytes=config.max_message_bytes, max_message_bytes=config.max_message_bytes,
                        max_call_bytes=config.max_call_bytes, max_inflight_bytes=config.max_inflight_bytes)
        self.registry = GraphRegistry(config.cache_bytes, config.store, limits, self.metrics)
        self.residuals = ResidualStore(config.residual_bytes, config.residual_ttl, metrics=self.metrics,
                                       max_sessions=config.residual_sessions, tag=config.process_tag)
        self.jobs = JobManager(self.engine, self.registry, JobStore(config.store, config.store_busy_seconds), limits,
                               config.job_runners, config.checkpoint_every, config.checkpoint_seconds,
                               history_points=config.job_history, max_waiters=config.max_watchers,
                               lease_seconds=config.lease_seconds, max_name=config.max_job_name,
                               max_optimizer_json=config.max_optimizer_json,
                               retention_count=config.job_retention_count, retention_days=config.job_retention_days)
        self.tensors = TensorStore(config.tensor_store_bytes, config.tensor_ttl, limits, self.metrics)
        self.servicer = Servicer(self.engine, self.registry, self.residuals, limits, self.metrics, config.max_concurrent,
                                 self.jobs, tensors=self.tensors, max_message_bytes=config.max_message_bytes)
        self.servicer.max_response_bytes = config.max_message_bytes  # an answer over it: RESOURCE_EXHAUSTED, counted so
        interceptors = [_TokenAuth(config.token, self.metrics, config.reflection_needs_token)] if config.token else []
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 1 if config.process_tag else 0)]  # one of --processes: the port is shared
        # calls that wait on jobs (at most max_watchers) get threads of their own: the `threads` stay for the others
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.threads + config.max_watchers,
                                                           thread_name_prefix="gradserve"),
                                interceptors=interceptors, options=options,
                                maximum_concurrent_rpcs=config.max_concurrent * 2)
        self.grpc.add_generic_rpc_handlers((self.servicer.handler(),))
        self.health = CappedHealth(config.max_health_watchers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (service_pb2.DESCRIPTOR.services_by_name["GradientService"].full_name, reflection.SERVICE_NAME,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.grpc)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
                self.port = self.grpc.add_secure_port(address, creds)
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as e:  # grpcio's answer to a port it cannot bind (in use, not this host's, refused TLS)
            raise OSError(f"cannot listen on {address}: {e}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        pool = self.pool
        self.metrics.gauge_fn("gradserve_workers", lambda: pool.size if pool is not None else 0)
        kernels = self.engine.kernels
        self.metrics.gauge_fn("gradserve_kernels_info", lambda: 1, mode=kernels.name, requested=config.kernels)
        if pool is not None:
            self.metrics.gauge_fn("gradserve_workers_replaced_total", lambda: pool.replaced)
        jobs = self.jobs
        self.metrics.gauge_fn("gradserve_jobs_active", lambda: jobs.active)
        self.metrics.gauge_fn("gradserve_job_waiters", lambda: jobs.waiting)
        self.metrics.gauge_fn("gradserve_health_watchers", lambda: self.health.watchers.held)
        self.metrics.gauge_fn("gradserve_job_lease", lambda: int(jobs.leader))
        self.metrics.gauge_fn("gradserve_serving", lambda: int(self.serving))
        if isinstance(self.engine, DistributedEngine):  # only the scheduler chooses modes and has workers
            scheduler = self.engine
            for mode in MODES:
                self.metrics.gauge_fn("gradserve_calls_by_mode_total", functools.partial(scheduler.modes.__getitem__, mode),
                                      mode=mode)
            scheduler.on_call = lambda mode, seconds: self.metrics.observe("gradserve_mode_seconds", seconds, mode=mode)
            for path, direction in ROUTES:  # what crosses between this process and its workers
                self.metrics.gauge_fn("gradserve_bytes_total", functools.partial(scheduler.bytes_moved.__getitem__,
                                                                                 (path, direction)),
                                      path=path, direction=direction)
        self._http: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()
        self._signalled: float | None = None  # monotonic time of the first SIGTERM/SIGINT
        self._shutdown: threading.Thread | None = None
        self.serving = False
        self._monitor = threading.Thread(target=self._watch_health, name="gradserve-health", daemon=True)

    def start(self) -> Server:
        self.jobs.start()
        self.grpc.start()
        if self.config.metrics_port is not None:
            self._http = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        self._check_health(force=True)
        self._monitor.start()
        return self

    def _check_health(self, force: bool = False) -> None:
        """SERVING while the server can do its work; NOT_SERVING (and why, in the log) while it cannot:
        a job runner died, the job store fails."""
        problem = self.jobs.problem()
        if self._stopped.is_set() or (not force and (problem is None) == self.serving):
            return
        self.serving = problem is None
        if problem is not None:
            log.error("health: NOT_SERVING: %s", problem)
        elif self._monitor.is_alive():
            log.warning("health: SERVING again")
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.health.set(name, status)

    def _watch_health(self) -> None:
        while not self._stopped.wait(0.5):
            try:
                self._check_health()
            except Exception:  # the monitor outlives any one failure
                log.exception("health monitor")

    @property
    def metrics_port(self) -> int | None:
        return self._http.server_address[1] if self._http is not None else None

    def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, new calls are refused (UNAVAILABLE), calls in flight get
        `grace` seconds to finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace if grace is None else grace
        start = time.monotonic()
        self.health.enter_graceful_shutdown()
        self.serving = False
        self.servicer.drain(grace)  # new calls: UNAVAILABLE; calls in flight: up to `grace` to finish
        # a job step in flight stops between kernels; running jobs stay running in the store: the next start resumes them
        self.jobs.stop(max(grace - (time.monotonic() - start), 0.5))
        self.grpc.stop(max(grace - (time.monotonic() - start), 0.0)).wait()
        self.jobs.close()
        if self._http is not None:
            self._http.shutdown()
        if self.pool is not None:
            import ray

            self.pool.shutdown()
            ray.shutdown()

    def wait(self) -> None:
        self.grpc.wait_for_termination()

    def stop_on_signals(self) -> None:
        def on_signal(signum, frame):
            if self._signalled is not None:
                return
            self._signalled = time.monotonic()
            log.info("signal %s: draining (grace %.1fs)", signum, self.config.grace)
            self._shutdown = threading.Thread(target=self.stop, name="gradserve-shutdown", daemon=True)
            self._shutdown.start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait_for_signal(self, margin: float = 2.0) -> None:
        """Block until a signal's drain is done, or `grace + margin` seconds after the signal,
        whichever is first (a call or step that ignores its cancellation is not waited for)."""
        while self._signalled is None:
            time.sleep(0.2)
        assert self._shutdown is not None
        self._shutdown.join(max(self._signalled + self.config.grace + margin - time.monotonic(), 0.0))
        if self._shutdown.is_alive():
            log.warning("exiting with the drain unfinished after %.1f s", time.monotonic() - self._signalled)
