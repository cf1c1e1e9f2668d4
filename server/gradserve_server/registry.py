"""The graph registry (an LRU bounded in bytes, optionally backed by a directory) and the store
of residual sessions (forward values kept under a handle, with a TTL and a memory budget)."""

from __future__ import annotations

import heapq
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from gradserve_engine.engine import Residuals
from gradserve_engine.errors import LimitError, NotFound
from gradserve_engine.ir import DEFAULT_LIMITS, Graph, Limits
from gradserve_engine.v1 import graph_pb2

from .metrics import Metrics

log = logging.getLogger("gradserve.registry")


@dataclass
class Entry:
    graph: Graph
    nbytes: int


class GraphRegistry:
    """Graphs by content hash. Registering is idempotent; the least recently used graphs are
    evicted past `max_bytes` (from memory only: with a store they reload on the next use)."""

    def __init__(self, max_bytes: int, store: Path | None = None, limits: Limits = DEFAULT_LIMITS,
                 metrics: Metrics | None = None):
        self.max_bytes = max_bytes
        self.limits = limits
        self.metrics = metrics or Metrics()
        self._graphs: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.store = store / "graphs" if store is not None else None
        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)

    def register(self, graph: Graph, wire: bytes) -> tuple[str, bool]:
        """Add a validated graph (with its wire bytes, for the store); returns (id, created)."""
        gid = graph.id
        with self._lock:
            if gid in self._graphs:
                self._graphs.move_to_end(gid)
                return gid, False
        created = True
        if self.store is not None:
            path = self.store / f"{gid}.pb"
            created = not path.exists()
            if created or path.read_bytes() != wire:  # new, or a damaged copy to repair
                _atomic_write(path, wire)
        self._insert(gid, Entry(graph, len(wire)))
        return gid, created

    def get(self, gid: str) -> Graph:
        with self._lock:
            entry = self._graphs.get(gid)
            if entry is not None:
                self._graphs.move_to_end(gid)
                self.metrics.inc("gradserve_graph_cache_hits_total")
                return entry.graph
        self.metrics.inc("gradserve_graph_cache_misses_total")
        graph, nbytes = self._load(gid)
        self._insert(gid, Entry(graph, nbytes))
        return graph

    def _load(self, gid: str) -> tuple[Graph, int]:
        path = self.store / f"{gid}.pb" if self.store is not None and _is_hex_id(gid) else None
        if path is None or not path.exists():
            raise NotFound(f"graph {gid} is not registered (register it again; the server may have restarted or evicted it)")
        data = path.read_bytes()
        try:
            msg = graph_pb2.Graph.FromString(data)
            graph = Graph.from_proto(msg, self.limits)
        except Exception as e:  # a damaged file: report, keep serving the rest
            log.error("stored graph %s is unreadable (%s); it must be registered again", path, e)
            raise NotFound(f"graph {gid} in the store is damaged ({e}); register it again") from None
        if graph.id != gid:
            log.error("stored graph %s fails its checksum (content hashes to %s)", path, graph.id)
            raise NotFound(f"graph {gid} in the store fails its checksum; register it again")
        return graph, len(data)

    def _insert(self, gid: str, entry: Entry) -> None:
        with self._lock:
            if gid in self._graphs:
                return
            self._graphs[gid] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._graphs) > 1:
                _, old = self._graphs.popitem(last=False)
                self._bytes -= old.nbytes
                self.metrics.inc("gradserve_graph_cache_evictions_total")
            self.metrics.set("gradserve_graph_cache_bytes", self._bytes)
            self.metrics.set("gradserve_graphs", len(self._graphs))

    def delete(self, gid: str) -> bool:
        with self._lock:
            entry = self._graphs.pop(gid, None)
            if entry is not None:
                self._bytes -= entry.nbytes
                self.metrics.set("gradserve_graph_cache_bytes", self._bytes)
                self.metrics.set("gradserve_graphs", len(self._graphs))
        stored = False
        if self.store is not None and _is_hex_id(gid) and (self.store / f"{gid}.pb").exists():
            (self.store / f"{gid}.pb").unlink()
            stored = True
        return entry is not None or stored

    def list(self) -> list[tuple[str, Graph, int]]:
        """Every registered graph: those in memory and those only in the store."""
        with self._lock:
            listed = [(gid, e.graph, e.nbytes) for gid, e in self._graphs.items()]
        if self.store is not None:
            known = {gid for gid, _, _ in listed}
            for path in sorted(self.store.glob("*.pb")):
                gid = path.stem
                if gid not in known:
                    try:
                        graph, nbytes = self._load(gid)
                    except NotFound:
                        continue
                    listed.append((gid, graph, nbytes))
        return listed


def _is_hex_id(gid: str) -> bool:
    return len(gid) == 64 and all(c in "0123456789abcdef" for c in gid)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Session:
    residuals: Residuals
    expires: float
    ttl: float
    nbytes: int


class ResidualStore:
    """Residual sessions by handle: released on close, on TTL, or (least recently used first)
    when the bytes kept would pass `max_bytes` or the sessions `max_sessions`; a released handle
    answers NOT_FOUND with the reason.

    Expiry costs O(log n) per call, amortised: a heap holds each session's expiry time as it
    was when pushed; a use renews only the session. A call pops the entries that are due:
    a session renewed since is pushed again at its new time (once per renewal at most), one
    closed or evicted is dropped, the rest expire. Entries of sessions gone early are dropped
    together once they outnumber the open sessions."""

    def __init__(self, max_bytes: int, default_ttl: float = 300.0, max_ttl: float = 3600.0,
                 metrics: Metrics | None = None, clock=time.monotonic, max_sessions: int = 10_000):
        self.max_bytes, self.default_ttl, self.max_ttl = max_bytes, default_ttl, max_ttl
        self.max_sessions = max_sessions
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._due: list[tuple[float, str]] = []  # a heap of (expiry when pushed, handle)
        self._gone: OrderedDict[str, str] = OrderedDict()  # recently released handle -> why
        self._bytes = 0
        self._lock = threading.Lock()

    def open(self, residuals: Residuals, ttl: float) -> tuple[str, float]:
        ttl = min(ttl, self.max_ttl) if ttl > 0 else self.default_ttl  # also NaN -> the default
        nbytes = residuals.nbytes
        if nbytes > self.max_bytes:
            raise LimitError(f"the forward values of this session take {nbytes} bytes, over the server's "
                             f"residual budget of {self.max_bytes}")
        if self.max_sessions < 1:
            raise LimitError("this server keeps no residual sessions (its session limit is 0)")
        handle = secrets.token_hex(16)
        with self._lock:
            self._expire()
            while self._bytes + nbytes > self.max_bytes and self._sessions:
                old, s = self._sessions.popitem(last=False)
                self._release(old, s, "released under memory pressure")
            while len(self._sessions) >= self.max_sessions:
                old, s = self._sessions.popitem(last=False)
                self._release(old, s, f"released: the server keeps at most {self.max_sessions} sessions")
            expires = self._clock() + ttl
            self._sessions[handle] = Session(residuals, expires, ttl, nbytes)
            heapq.heappush(self._due, (expires, handle))
            self._bytes += nbytes
            self._gauge()
        return handle, ttl

    def get(self, handle: str) -> Residuals:
        with self._lock:
            self._expire()
            s = self._sessions.get(handle)
            if s is None:
                why = self._gone.get(handle, "unknown")
                raise NotFound(f"residual session {handle} is gone ({why}); call vjp again")
            s.expires = self._clock() + s.ttl  # each use renews the lease (its heap entry moves when due)
            self._sessions.move_to_end(handle)
            return s.residuals

    def alive(self, handle: str) -> bool:
        """Whether the session is open and within its TTL (a look, not a use: no renewal)."""
        with self._lock:
            s = self._sessions.get(handle)
            return s is not None and s.expires > self._clock()

    def close(self, handle: str) -> bool:
        with self._lock:
            s = self._sessions.pop(handle, None)
            if s is None:
                return False
            self._release(handle, s, "closed")
            return True

    def _expire(self) -> None:
        now = self._clock()
        due = self._due
        while due and due[0][0] <= now:
            _, handle = heapq.heappop(due)
            s = self._sessions.get(handle)
            if s is None:
                continue  # closed or evicted: its entry was left behind
            if s.expires > now:
                heapq.heappush(due, (s.expires, handle))  # renewed since it was pushed
            else:
                del self._sessions[handle]
                self._release(handle, s, "its TTL passed")
        if len(due) > 2 * len(self._sessions) + 64:  # mostly entries of sessions gone early
            self._due = [(s.expires, h) for h, s in self._sessions.items()]
            heapq.heapify(self._due)

    def _release(self, handle: str, s: Session, why: str) -> None:
        self._bytes -= s.nbytes
        self._gone[handle] = why
        while len(self._gone) > 10_000:
            self._gone.popitem(last=False)
        self.metrics.inc("gradserve_residual_sessions_released_total")
        self._gauge()

    def _gauge(self) -> None:
        self.metrics.set("gradserve_residual_sessions", len(self._sessions))
        self.metrics.set("gradserve_residual_bytes", self._bytes)
