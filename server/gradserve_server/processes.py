"""`gradserve serve --processes N`: N server processes on one port, so calls use every core.

One Python process answers gRPC calls on one core at a time (the GIL), so the parent started by
`gradserve serve --processes N` serves nothing itself: it starts N ordinary servers that bind the
same port with SO_REUSEPORT (the kernel spreads incoming connections over them), watches them
(one that dies is started again), and on SIGTERM/SIGINT forwards the signal so that all of them
drain within `--grace`.

What the processes share, and what they do not:
- the graph store and the jobs store: the `--store` folder, or (without one) a temporary folder
  that lives as long as the parent; a graph registered through one process is read from disk by
  the others, and one process at a time runs the jobs (the store's job lease);
- not the tensor store and not residual sessions: they live in the process that made them. A
  gRPC channel is one connection, so every call of an SDK session reaches the process its first
  call did; a vjp handle says which process holds it, and a call that reaches another is told so
  (NOT_FOUND). A tensor put through one session and named from another connection that lands
  elsewhere is NOT_FOUND too, and the SDK uploads it again if it holds it;
- metrics: each process serves its own on a loopback port; the parent's `--metrics-port` answers
  all of them at once, each sample labelled `process="<k>"` (sum them by the other labels).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gradserve_engine.threads import available_cores

from .app import Config
from .metrics import Families, serve_exposition

log = logging.getLogger("gradserve_server.processes")
TAG_VAR = "GRADSERVE_PROCESS_TAG"  # set in each child: its index (not a flag: the parent sets it)
LISTENING = re.compile(r"gradserve listening on [^\s,]+:(\d+)(?:, metrics on [\d.]+:(\d+)/metrics)?")
RESTART_PAUSE = 1.0  # seconds before a child that died is started again


class Child:
    def __init__(self, tag: int, cmd: list[str], threads: int):
        self.tag, self.cmd, self.threads = tag, cmd, threads
        self.proc: subprocess.Popen[str] | None = None
        self.metrics_port: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, TAG_VAR: str(self.tag)}
        if "OMP_NUM_THREADS" not in env:  # each its share of the cores: its thread pool and BLAS's threads
            env["OMP_NUM_THREADS"] = str(self.threads)
        proc = self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
        reader.start()
        reader.join(timeout)
        m = LISTENING.search(box[0]) if box else None
        if m is None:
            proc.kill()
            raise RuntimeError(f"server process {self.tag} did not start (exit status {proc.poll()}); its log says why")
        self.metrics_port = int(m[2]) if m[2] else None


class Supervisor:
    """The parent of `--processes N`: starts, watches, drains and aggregates N servers."""

    def __init__(self, config: Config, argv: Sequence[str]):
        if config.ray or config.ray_address is not None:
            raise ValueError("--processes with Ray: each process would start or join Ray on its own; run one process")
        self.config = config
        self._tmp = None if config.store is not None else tempfile.mkdtemp(prefix="gradserve-store-")
        self.store = str(config.store) if config.store is not None else self._tmp
        self.port = config.port or _free_port(config.host)
        cmd = [sys.executable, "-m", "gradserve_server.cli", *argv, "--port", str(self.port), "--processes", "1",
               "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--store", str(self.store)]
        threads = max(1, available_cores() // config.processes)
        self.children = [Child(k, cmd, threads) for k in range(config.processes)]
        self._stopping = threading.Event()
        self._http: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None

    def start(self) -> Supervisor:
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self._terminate(0.0)
            raise
        if self.config.metrics_port is not None:
            self._http = _serve_metrics(self, self.config.metrics_host, self.config.metrics_port)
            self.metrics_port = self._http.server_address[1]
        threading.Thread(target=self._watch, name="gradserve-supervisor", daemon=True).start()
        return self

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None and not self._stopping.is_set():
                    log.error("server process %d exited with status %s; starting it again", child.tag,
                              child.proc.returncode)
                    time.sleep(RESTART_PAUSE)
                    try:
                        child.start()
                    except RuntimeError as e:
                        log.error("%s", e)

    def wait_for_signal(self) -> int:
        """Block until SIGTERM/SIGINT, then forward it and wait for every process's drain."""
        got = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: got.set())
        while not got.wait(0.5):
            pass
        self._stopping.set()
        self._terminate(self.config.grace + 5.0)
        return 0

    def _terminate(self, wait: float) -> None:
        self._stopping.set()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + wait
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(10)
        if self._http is not None:
            self._http.shutdown()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def families(self) -> Iterator[Metric]:
        """Every child's metrics, each sample labelled with its process."""
        merged: dict[str, Metric] = {}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1
        for child in self.children:
            if child.metrics_port is None:
                continue
            try:
                with opener.open(f"http://127.0.0.1:{child.metrics_port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError as e:
                log.warning("metrics of server process %d: %s", child.tag, e)
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                into.samples += [s._replace(labels={**s.labels, "process": str(child.tag)}) for s in family.samples]
        return iter(merged.values())


def _serve_metrics(supervisor: Supervisor, host: str, port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(Families(supervisor.families))

    def render(accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    return serve_exposition(host, port, render)


def _free_port(host: str) -> int:
    """A port nobody listens on now, for the children to share (they bind it with SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
