"""The graph registry (an LRU bounded in bytes, optionally backed by a directory) and the store
of residual sessions (forward values kept under a handle, with a TTL and a memory budget)."""

from __future__ import annotations

import builtins
import errno
import heapq
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from gradserve_engine.engine import Residuals
from gradserve_engine.errors import LimitError, NotFound, StoreError
from gradserve_engine.ir import DEFAULT_LIMITS, Graph, Limits
from gradserve_engine.v1 import graph_pb2

from .metrics import Metrics

log = logging.getLogger("gradserve.registry")

TMP_PREFIX = ".tmp-"  # a graph file being written; renamed into place once whole and synced
STALE_TMP_SECONDS = 60.0  # a temporary unchanged this long was left by a write that was killed
ID_LOCKS = 64  # stripes of the per-id locks
SUMMARIES = 1 << 16  # summaries of graphs not in memory kept for listings (LRU)


@dataclass
class Entry:
    graph: Graph
    nbytes: int


@dataclass(frozen=True)
class Summary:
    """What a listing says of a graph (a graph's content never changes under its id)."""

    nodes: int
    inputs: int
    outputs: int
    nbytes: int

    @classmethod
    def of(cls, graph: Graph, nbytes: int) -> Summary:
        return cls(len(graph.nodes), len(graph.inputs), len(graph.outputs), nbytes)


class GraphRegistry:
    """Graphs by content hash. Registering is idempotent; the least recently used graphs are
    evicted past `max_bytes` (from memory only: with a store they reload on the next use).

    With a store, register, delete and a get that loads from it hold a lock of the id (one of
    ID_LOCKS stripes), so they are linearisable: a register is acknowledged once its file is
    whole on disk, and a graph is in memory only while its file is there. The store is read
    through regular files only: a link, a directory, a FIFO or a device under a graph's name is
    skipped and logged, never followed, read or waited on; temporaries of killed writes are
    removed at start."""

    def __init__(self, max_bytes: int, store: Path | None = None, limits: Limits = DEFAULT_LIMITS,
                 metrics: Metrics | None = None):
        self.max_bytes = max_bytes
        self.limits = limits
        self.metrics = metrics or Metrics()
        self._graphs: OrderedDict[str, Entry] = OrderedDict()
        self._summaries: OrderedDict[str, Summary] = OrderedDict()  # graphs listed or evicted, not in memory
        self._bytes = 0
        self._lock = threading.Lock()
        self._id_locks = [threading.Lock() for _ in range(ID_LOCKS)]
        self._warned: set[str] = set()  # entries of the store already reported as skipped
        self._damaged: dict[str, tuple[int, int, int]] = {}  # ids whose file failed to load, by its stamp then
        self.store = store / "graphs" if store is not None else None
        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            self._scan_store()

    def _id_lock(self, gid: str) -> threading.Lock:
        return self._id_locks[hash(gid) % ID_LOCKS]

    def register(self, graph: Graph, wire: bytes) -> tuple[str, bool]:
        """Add a validated graph (with its wire bytes, for the store); returns (id, created)."""
        gid = graph.id
        if self._cached(gid) is not None and self._on_disk(gid):
            return gid, False
        with self._id_lock(gid):
            if self._cached(gid) is not None:
                if self._on_disk(gid):
                    return gid, False
                self._drop(gid)  # deleted by another server on this store: write it again
            created = True
            if self.store is not None:
                path = self.store / f"{gid}.pb"
                stored, foreign = None, ""
                try:
                    stored = _read_regular(path)
                    created = False
                except FileNotFoundError:
                    pass
                except _NotRegular as e:
                    foreign = str(e)
                if stored != wire:  # new, or a damaged copy to repair
                    _atomic_write(path, wire)
                    if foreign:
                        log.warning("graph store: %s was %s; the graph's file replaced it", path, foreign)
            self._insert(gid, Entry(graph, len(wire)))
        return gid, created

    def get(self, gid: str) -> Graph:
        graph = self._cached(gid)
        if graph is not None and self._on_disk(gid):
            self.metrics.inc("gradserve_graph_cache_hits_total")
            return graph
        if graph is not None:  # another server on this store deleted it: so is it here
            with self._id_lock(gid):
                if not self._on_disk(gid):
                    self._drop(gid)
        self.metrics.inc("gradserve_graph_cache_misses_total")
        with self._id_lock(gid):  # a delete cannot run between the load and the insert
            graph = self._cached(gid)
            if graph is None:
                graph, nbytes = self._load(gid)
                self._insert(gid, Entry(graph, nbytes))
        return graph

    def describe(self, gid: str) -> tuple[Graph, Summary]:
        """A registered graph and its listing's summary (NotFound as `get`)."""
        graph = self.get(gid)
        with self._lock:
            entry = self._graphs.get(gid)
        nbytes = entry.nbytes if entry is not None else len(graph.to_proto().SerializeToString(deterministic=True))
        return graph, Summary.of(graph, nbytes)

    def holds(self, gid: str) -> bool:
        """Whether the graph is in memory here (served to calls), without touching its LRU place."""
        with self._lock:
            return gid in self._graphs

    def _cached(self, gid: str) -> Graph | None:
        with self._lock:
            entry = self._graphs.get(gid)
            if entry is None:
                return None
            self._graphs.move_to_end(gid)
            return entry.graph

    def _load(self, gid: str) -> tuple[Graph, int]:
        gone = NotFound(f"graph {gid} is not registered (register it again; the server may have restarted or evicted it)")
        path = self.store / f"{gid}.pb" if self.store is not None and is_graph_id(gid) else None
        if path is None:
            raise gone
        try:
            data = _read_regular(path)
        except FileNotFoundError:
            raise gone from None
        except _NotRegular as e:
            self._warn(path, f"{e}, not a graph file: it is skipped")
            raise gone from None
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
            self._summaries.pop(gid, None)
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._graphs) > 1:
                old_id, old = self._graphs.popitem(last=False)
                self._bytes -= old.nbytes
                self._summarise(old_id, Summary.of(old.graph, old.nbytes))
                self.metrics.inc("gradserve_graph_cache_evictions_total")
            self.metrics.set("gradserve_graph_cache_bytes", self._bytes)
            self.metrics.set("gradserve_graphs", len(self._graphs))

    def _summarise(self, gid: str, summary: Summary) -> None:
        """Keep a listing's summary of a graph not in memory (under the lock)."""
        self._summaries[gid] = summary
        self._summaries.move_to_end(gid)
        while len(self._summaries) > SUMMARIES:
            self._summaries.popitem(last=False)

    def _on_disk(self, gid: str) -> bool:
        """Whether the graph's file is in the store (True without a store). Servers sharing a
        store (`--processes`) may delete each other's graphs: memory follows the disk."""
        return self.store is None or os.path.lexists(self.store / f"{gid}.pb")

    def _drop(self, gid: str) -> Entry | None:
        """Forget a graph in memory (and its listing's summary)."""
        with self._lock:
            entry = self._graphs.pop(gid, None)
            self._summaries.pop(gid, None)
            if entry is not None:
                self._bytes -= entry.nbytes
                self.metrics.set("gradserve_graph_cache_bytes", self._bytes)
                self.metrics.set("gradserve_graphs", len(self._graphs))
        return entry

    def delete(self, gid: str) -> bool:
        with self._id_lock(gid):
            entry = self._drop(gid)
            stored = False
            if self.store is not None and is_graph_id(gid):
                path = self.store / f"{gid}.pb"
                try:
                    mode = path.lstat().st_mode
                    if stat.S_ISDIR(mode):
                        self._warn(path, "a directory, not a graph file: it is left alone")
                    else:
                        path.unlink()
                        stored = stat.S_ISREG(mode)
                except FileNotFoundError:
                    pass
        return entry is not None or stored

    def list(self, after: str | None, limit: int) -> tuple[list[tuple[str, Summary]], bool]:
        """A page of the registered graphs (those in memory and those only in the store), by id:
        the first `limit` with ids after `after` (None: from the first), and whether more follow.
        Graphs the store holds damaged are left out."""
        with self._lock:
            held = {gid: Summary.of(e.graph, e.nbytes) for gid, e in self._graphs.items()}
        ids = set(held)
        if self.store is not None:
            ids.update(self._stored_ids())
        page: list[tuple[str, Summary]] = []
        for gid in sorted(gid for gid in ids if after is None or gid > after):
            summary = held.get(gid) or self._summary(gid)
            if summary is None:
                continue
            if len(page) == limit:  # a listed graph follows: the last page is never empty
                return page, True
            page.append((gid, summary))
        return page, False

    def _summary(self, gid: str) -> Summary | None:
        """The summary of a graph not in memory (None: not in the store, or damaged there)."""
        with self._lock:
            summary = self._summaries.get(gid)
            if summary is not None:
                self._summaries.move_to_end(gid)
                return summary
        seen = self._file_stamp(gid)
        if seen is not None and self._damaged.get(gid) == seen:  # parsed before and refused: unchanged since
            return None
        try:
            graph, nbytes = self._load(gid)
        except NotFound:
            if seen is not None:
                with self._lock:
                    self._damaged[gid] = seen
                    while len(self._damaged) > 10_000:
                        self._damaged.pop(next(iter(self._damaged)))
            return None
        summary = Summary.of(graph, nbytes)
        with self._lock:
            self._summarise(gid, summary)
        return summary

    def _file_stamp(self, gid: str) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of a graph's file, None when there is none."""
        if self.store is None:
            return None
        try:
            st = (self.store / f"{gid}.pb").lstat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _stored_ids(self) -> builtins.list[str]:
        """The ids of the store's graph files (regular files named <id>.pb; the rest is skipped)."""
        assert self.store is not None
        ids = []
        with os.scandir(self.store) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(TMP_PREFIX):
                    continue
                if name.endswith(".pb") and is_graph_id(name[:-3]) and entry.is_file(follow_symlinks=False):
                    ids.append(name[:-3])
                else:
                    self._warn(Path(entry.path), f"{_kind(entry)}, not a graph file: it is skipped")
        return ids

    def _scan_store(self) -> None:
        """At start: remove the temporaries of killed writes, report what is not a graph file."""
        assert self.store is not None
        now = time.time()
        with os.scandir(self.store) as entries:
            for entry in entries:
                if not entry.name.startswith(TMP_PREFIX):
                    continue
                path = Path(entry.path)
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        self._warn(path, "a directory, not a graph file: it is skipped")
                    elif now - st.st_mtime >= STALE_TMP_SECONDS:  # younger: another server's write in progress
                        path.unlink()
                        log.info("graph store: removed %s, left by a write that did not finish", path)
                except FileNotFoundError:
                    pass
        self._stored_ids()

    def _warn(self, path: Path, what: str) -> None:
        """Log a skipped entry of the store once."""
        if path.name not in self._warned:
            self._warned.add(path.name)
            log.warning("graph store: %s is %s", path, what)


class _NotRegular(Exception):
    """A path of the store that is not a regular file; the message says what it is."""


def _kind(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return "a symbolic link"
    if entry.is_dir(follow_symlinks=False):
        return "a directory"
    if not entry.is_file(follow_symlinks=False):
        return "a FIFO, socket or device"
    return "a file not named <graph id>.pb"


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file; _NotRegular for anything else, which is neither followed
    (links), nor opened (devices), nor waited on (FIFOs); FileNotFoundError when nothing is there."""
    mode = path.lstat().st_mode
    if not stat.S_ISREG(mode):
        raise _NotRegular("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                          else "a FIFO, socket or device")
    try:  # the entry may change after the lstat: open without following or blocking, and look again
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _NotRegular("a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular("not a regular file")
        return f.read()


def is_graph_id(gid: str) -> bool:
    """Whether `gid` has the form of a graph's id (64 lowercase hex digits, the content hash)."""
    return len(gid) == 64 and all(c in "0123456789abcdef" for c in gid)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a synced temporary renamed over it, the rename synced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            log.error("graph store: %s is a directory; graph %s cannot be stored until it is moved aside", path, path.stem)
            raise StoreError(f"the server's graph store holds a directory where graph {path.stem} goes; it cannot "
                             "be stored until the server's operator moves that aside") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
                 metrics: Metrics | None = None, clock=time.monotonic, max_sessions: int = 10_000, tag: str = ""):
        """`tag` names this server process among several on one port (`--processes`): handles
        begin with it, so a call that reaches another process is told where its session lives."""
        self.max_bytes, self.default_ttl, self.max_ttl = max_bytes, default_ttl, max_ttl
        self.max_sessions = max_sessions
        self.tag = tag
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
        handle = f"p{self.tag}-{secrets.token_hex(16)}" if self.tag else secrets.token_hex(16)
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
                home = handle.partition("-")[0][1:] if handle.startswith("p") and "-" in handle else self.tag
                if home != self.tag:
                    raise NotFound(f"residual session {handle} lives in server process {home}, and this call reached "
                                   f"process {self.tag or 'of a single-process server'}: send a session's calls over the "
                                   "channel that opened it (the SDK does)")
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
