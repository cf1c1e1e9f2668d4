"""Hardening: listings and the store. Each test is a hostile tester's finding:

  1. three jobs with a 90 MiB optimizer_json (or three graphs with huge names) made ListJobs
     (ListGraphs) exceed the message limit for every client, for good: list RPCs answer pages of
     summaries (AIP-158: page_size, an opaque page_token, next_page_token, a stable order), the
     SDK and `gradserve jobs list` follow the pages, and SubmitJob bounds every free-form field;
  2. concurrent RegisterGraph/DeleteGraph left graphs served but not on disk, and answered
     INTERNAL FileNotFoundError: register, delete and get of one id are linearisable;
  3. a FIFO in graphs/ hung ListGraphs, a directory made it INTERNAL, symlinks were followed out
     of the store, and temporaries of killed writes stayed;
  4. health Watch streams were uncapped;
  5. Job.wait failed when the server had no room for another WatchJob stream.

(CancelJob answering "running" past a long step is tests/test_hardening_jobs.py's.) Every limit is
tested with a small configured value; nothing here allocates more than a few MiB.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import HOST, channel, fill, health_status, metric, parse_metrics, rpc_error, scrape, stub, wait_until

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve_engine.errors import NotFound
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import emit as e
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server import bounds, cli
from gradserve_server import registry as registry_module
from gradserve_server.app import Config, MiB
from gradserve_server.jobs import JobStore
from gradserve_server.registry import GraphRegistry

INVALID_ARGUMENT, RESOURCE_EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def address(server) -> str:
    return f"{HOST}:{server.port}"


def scaled(k: float, name: str = "x") -> Graph:
    """out = k * x for a float64[3] input named `name`: a distinct graph (id) per (k, name)."""
    b = Builder()
    x = b.input(name, "float64", (3,))
    return b.build([("out", e.mul(x, k))])


def wire(g: Graph) -> bytes:
    return g.to_proto().SerializeToString(deterministic=True)


def square_loss() -> Graph:
    b = Builder()
    w = b.input("w", "float64", (3,))
    return b.build([("loss", e.bind("reduce_sum", e.mul(w, w), axes=(0,), keepdims=False))])


def spec(**fields) -> pb.JobSpec:
    """A valid job spec (a few Adam steps on sum(w**2)) with `fields` set over it."""
    s = pb.JobSpec(graph=square_loss().to_proto(), optimizer_json='{"name": "Adam", "lr": 0.1}', steps=3)
    fill(s.params0, {"w": np.ones(3)})
    for k, v in fields.items():
        if k == "arg_order":
            s.arg_order.extend(v)
        else:
            setattr(s, k, v)
    return s


def old_jobs(directory: Path, jobs: list[tuple[str, float, str, str]]) -> None:
    """Finished jobs written straight into a job store, as a server before the spec limits
    stored them: (id, created, name, optimizer_json) each."""
    store = JobStore(directory)
    with store.tx() as db:
        for job_id, created, name, optimizer in jobs:
            db.execute("INSERT INTO jobs VALUES (?, ?, 'succeeded', 3, 3, 0.5, 0.1, 'done', ?, ?, 0.5, ?, ?)",
                       (job_id, name, created, created, "ab" * 32, optimizer))
    store.close()


def all_pages(call, request_type, field: str, page_size: int, token: str = "") -> list[list]:
    """Every page of a list RPC through a bare stub (entries of `field` per page), from `token` on."""
    pages = []
    while True:
        resp = call(request_type(page_size=page_size, page_token=token), timeout=10)
        pages.append(list(getattr(resp, field)))
        token = resp.next_page_token
        if not token:
            return pages


# ---------------------------------------------------------------- 1: listings are pages of summaries


def test_graph_listing_is_summaries_whatever_the_graphs_hold(serve_in_process, tmp_path):
    """Three graphs each with a 360 KiB input name: ListGraphs under a 1 MiB message limit
    answers (it used to carry every graph's names, over 1 MiB), also from the store after a
    restart; each entry says the counts and sizes, never the graph."""
    graphs = [scaled(float(k), name=f"{k}" + "x" * (360 << 10)) for k in range(3)]
    first = serve_in_process(store=tmp_path, max_message_bytes=1 * MiB)
    with channel(address(first)) as ch:
        for g in graphs:
            stub(ch).RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
    first.stop(grace=0)
    again = serve_in_process(store=tmp_path, max_message_bytes=1 * MiB)  # a restart: the graphs are in the store only
    with channel(address(again)) as ch:
        resp = stub(ch).ListGraphs(pb.ListGraphsRequest(), timeout=10)
        assert resp.ByteSize() < 4096 and not resp.next_page_token
        infos = {i.graph_id: i for i in resp.graphs}
        assert set(infos) == {g.id for g in graphs}
        for g in graphs:
            info = infos[g.id]
            assert (info.nodes, info.input_count, info.output_count, info.bytes) == (
                len(g.nodes), len(g.inputs), len(g.outputs), len(wire(g)))


def test_job_listing_of_a_store_with_huge_optimizer_specs(serve_in_process, tmp_path):
    """Jobs stored with 600 KiB optimizer specs (before the limits) under a 1 MiB message limit:
    ListJobs answers summaries (no optimizer spec, name cut), GetJob still the whole job."""
    optimizer = '{"name": "Adam", "lr": 0.1}' + " " * (600 << 10)
    old_jobs(tmp_path, [(f"job{k}", 1000.0 + k, "n" * 5000, optimizer) for k in range(3)])
    server = serve_in_process(store=tmp_path, max_message_bytes=1 * MiB)
    with channel(address(server)) as ch:
        st = stub(ch)
        resp = st.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert [j.job_id for j in resp.jobs] == ["job0", "job1", "job2"] and not resp.next_page_token
        for j in resp.jobs:
            assert j.optimizer_json == "" and j.name == "n" * 256 and j.status == "succeeded" and j.step == 3
        full = st.GetJob(pb.GetJobRequest(job_id="job1"), timeout=10).job
        assert full.optimizer_json == optimizer and full.name == "n" * 5000


def test_list_rpcs_page_in_a_stable_order(serve_in_process, tmp_path, monkeypatch):
    """AIP-158: every entry once, in order, over pages of page_size; 0 means the default, more
    than the maximum means the maximum; entries added or removed between pages never make a
    page repeat or skip one that stays; bad sizes and tokens are INVALID_ARGUMENT."""
    created = [1000.0 + k // 3 for k in range(14)]  # ties in the created time: the id orders them
    old_jobs(tmp_path, [(f"job{k:02d}", c, f"j{k}", "{}") for k, c in enumerate(created)])
    server = serve_in_process(store=tmp_path)
    graphs = [scaled(float(k)) for k in range(17)]
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        st = stub(ch)
        for g in graphs:
            remote.register(g)
        refs = [remote.put(np.full(2, float(k))) for k in range(11)]
        for call, request, field, key, want in (
                (st.ListGraphs, pb.ListGraphsRequest, "graphs", "graph_id", sorted(g.id for g in graphs)),
                (st.ListJobs, pb.ListJobsRequest, "jobs", "job_id", [f"job{k:02d}" for k in range(14)]),
                (st.ListTensors, pb.ListTensorsRequest, "tensors", "ref", sorted(r.id for r in refs))):
            for size in (1, 4, 5, len(want), 1000):
                pages = all_pages(call, request, field, size)
                assert [len(p) for p in pages[:-1]] == [size] * (len(pages) - 1) and 0 < len(pages[-1]) <= size
                assert [getattr(x, key) for p in pages for x in p] == want, (field, size)
            assert [getattr(x, key) for x in getattr(call(request(), timeout=10), field)] == want
            assert rpc_error(call, request(page_size=-1), timeout=10).code() == INVALID_ARGUMENT
            for token in ("garbage", "x" * 5000, bounds.next_token("other", ("a",)), bounds.next_token(field, (1, 2, 3))):
                err = rpc_error(call, request(page_token=token), timeout=10)
                assert err.code() == INVALID_ARGUMENT and "page_token" in err.details()
        monkeypatch.setattr(bounds, "MAX_PAGE_SIZE", 5)
        monkeypatch.setattr(bounds, "DEFAULT_PAGE_SIZE", 3)
        assert len(st.ListGraphs(pb.ListGraphsRequest(page_size=50), timeout=10).graphs) == 5
        assert len(st.ListGraphs(pb.ListGraphsRequest(), timeout=10).graphs) == 3

        first = st.ListGraphs(pb.ListGraphsRequest(page_size=5), timeout=10)  # changes between pages
        listed = [i.graph_id for i in first.graphs]
        ids = sorted(g.id for g in graphs)
        gone = {listed[2], ids[-1]}  # one listed already, one not yet
        for gid in gone:
            remote.delete(gid)
        added = {remote.register(scaled(100.0 + k)) for k in range(6)}
        later = [i.graph_id for p in all_pages(st.ListGraphs, pb.ListGraphsRequest, "graphs", 5, first.next_page_token)
                 for i in p]
        # each entry that stayed once, none that went; of those added, the ones past the cursor
        assert later == sorted(gid for gid in (set(ids) - gone) | added if gid > listed[-1])


def test_the_sdk_and_the_cli_follow_every_page(serve_in_process, monkeypatch, capsys):
    monkeypatch.setattr(rm, "LIST_PAGE_SIZE", 2)
    server = serve_in_process()
    with gs.connect(address(server), timeout=30) as remote:
        graphs = {remote.register(scaled(float(k))) for k in range(5)}
        refs = {remote.put(np.full(2, float(k))).id for k in range(5)}
        jobs = [remote.minimize(lambda w: gs.sum(w ** 2), np.ones(3), optimizer=optim.Adam(lr=0.1), steps=3, name=f"j{k}")
                for k in range(5)]
        assert {i.graph_id for i in remote.graphs()} == graphs
        listing = remote.tensors()
        assert {t.ref for t in listing.tensors} == refs and listing.bytes == 5 * 16 and not listing.next_page_token
        assert [j.id for j in remote.jobs()] == [j.id for j in jobs]
        assert [s.name for s in remote.job_summaries()] == [f"j{k}" for k in range(5)]
    assert cli.main(["jobs", "list", "--address", address(server)]) == 0
    printed = capsys.readouterr().out
    assert all(job.id in printed for job in jobs)


def test_submit_job_bounds_every_free_form_field(serve_in_process):
    limit = 70_000
    server = serve_in_process(max_job_name=16, max_optimizer_json=limit)
    adam = '{"name": "Adam", "lr": 0.1}'
    with channel(address(server)) as ch:
        st = stub(ch)
        for bad, named in ((spec(name="n" * 17), ["name", "17", "16"]),
                           (spec(optimizer_json=adam + " " * (limit + 1 - len(adam))), ["optimizer_json", "70001", "70000"]),
                           (spec(optimizer_json="[" * 30_000 + "]" * 30_000), ["optimizer", "nests"]),
                           (spec(graph_id="x" * 10_000), ["graph_id", "64"]),
                           (spec(arg_order=["w", "w"]), ["arg_order", "'w'"])):
            err = rpc_error(st.SubmitJob, pb.SubmitJobRequest(spec=bad), timeout=10)
            assert err.code() == INVALID_ARGUMENT and all(n in err.details() for n in named), err.details()
            assert len(err.details()) < 400
        ok = spec(name="n" * 16, optimizer_json=adam + " " * (limit - len(adam)), graph_id=square_loss().id)
        job = st.SubmitJob(pb.SubmitJobRequest(spec=ok), timeout=10).job
        assert job.name == "n" * 16 and job.optimizer_json == ok.optimizer_json
        assert [j.job_id for j in st.ListJobs(pb.ListJobsRequest(), timeout=10).jobs] == [job.job_id]


def test_the_spec_limits_default_to_what_the_proto_documents():
    assert (Config().max_job_name, Config().max_optimizer_json) == (256, 65_536)
    assert (bounds.DEFAULT_PAGE_SIZE, bounds.MAX_PAGE_SIZE) == (100, 1000)
    text = (Path(__file__).resolve().parent.parent / "proto" / "gradserve" / "v1" / "service.proto").read_text()
    assert "name 256 characters, optimizer_json 65,536 characters" in text
    assert "page_size entries at most (0: 100; more than 1000: 1000)" in text


# ---------------------------------------------------------------- 2: register and delete are linearisable


def test_a_delete_during_a_register_leaves_memory_and_disk_agreeing(tmp_path, monkeypatch):
    """The interleaving behind "acknowledged, then NOT_FOUND after a restart": a delete of the id
    while a register of it has written its file but not yet put the graph in memory."""
    g = scaled(2.0)
    written, resume = threading.Event(), threading.Event()
    original = registry_module._atomic_write

    def slow_write(path, data):
        original(path, data)
        written.set()
        resume.wait(10)

    monkeypatch.setattr(registry_module, "_atomic_write", slow_write)
    reg = GraphRegistry(1 << 20, tmp_path)
    registering = threading.Thread(target=reg.register, args=(g, wire(g)))
    registering.start()
    assert written.wait(10)
    deleted: list[bool] = []
    deleting = threading.Thread(target=lambda: deleted.append(reg.delete(g.id)))
    deleting.start()
    deleting.join(0.3)  # a linearisable delete waits for the register of its id
    resume.set()
    registering.join(10)
    deleting.join(10)
    assert deleted == [True]  # the register came first; the delete removed it from memory and disk
    assert _served(reg, g.id) == _served(GraphRegistry(1 << 20, tmp_path), g.id) is False


def _served(reg: GraphRegistry, gid: str) -> bool:
    try:
        reg.get(gid)
        return True
    except NotFound:
        return False


def test_racing_registers_deletes_and_gets_agree_with_the_disk_after_a_restart(tmp_path):
    """48 threads register, delete and get four ids for a second, with a cache that holds one
    graph (so most calls go to the disk): no call fails but with NOT_FOUND, and a registry started
    over the store afterwards serves exactly the graphs the first one serves."""
    graphs = [scaled(float(k)) for k in range(4)]
    reg = GraphRegistry(1, tmp_path)
    failures: list[BaseException] = []
    stop = time.monotonic() + 1.0

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                g = rng.choice(graphs)
                op = rng.random()
                if op < 0.4:
                    assert reg.register(g, wire(g))[0] == g.id
                elif op < 0.7:
                    reg.delete(g.id)
                else:
                    _served(reg, g.id)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures[:3]
    for g in graphs:
        on_disk = (tmp_path / "graphs" / f"{g.id}.pb").exists()
        assert _served(reg, g.id) == on_disk == _served(GraphRegistry(1 << 20, tmp_path), g.id), g.id
    assert not [p for p in (tmp_path / "graphs").iterdir() if p.name.startswith(registry_module.TMP_PREFIX)]


# ---------------------------------------------------------------- 3: the graphs/ directory holds regular files only


def test_the_graph_store_reads_regular_files_only(serve_in_process, tmp_path, caplog):
    """A FIFO, a directory and a symbolic link (to a valid graph outside the store) under graph
    names, a stale temporary and a young one: listing and getting answer at once, serve only the
    regular file, follow nothing; the stale temporary goes at start; each is logged."""
    good, fifo, folder, linked = scaled(1.0), scaled(2.0), scaled(3.0), scaled(4.0)
    store = tmp_path / "store"
    graphs = store / "graphs"
    graphs.mkdir(parents=True)
    (graphs / f"{good.id}.pb").write_bytes(wire(good))
    os.mkfifo(graphs / f"{fifo.id}.pb")
    os.mkfifo(graphs / "stray-fifo")
    (graphs / f"{folder.id}.pb").mkdir()
    outside = tmp_path / "outside.pb"
    outside.write_bytes(wire(linked))
    (graphs / f"{linked.id}.pb").symlink_to(outside)
    stale, young = graphs / f"{registry_module.TMP_PREFIX}stale", graphs / f"{registry_module.TMP_PREFIX}young"
    stale.write_bytes(b"half a graph")
    young.write_bytes(b"another server's write in progress")
    old = time.time() - 2 * registry_module.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    caplog.set_level(logging.INFO, logger="gradserve.registry")

    server = serve_in_process(store=store)
    assert not stale.exists() and young.exists()
    with channel(address(server)) as ch, gs.connect(address(server), timeout=10) as remote:
        st = stub(ch)
        assert [i.graph_id for i in st.ListGraphs(pb.ListGraphsRequest(), timeout=5).graphs] == [good.id]
        for g in (fifo, folder, linked):
            req = pb.EvaluateRequest(graph_id=g.id)
            fill(req.inputs, {"x": np.ones(3)})
            assert rpc_error(st.Evaluate, req, timeout=5).code() == grpc.StatusCode.NOT_FOUND
        assert remote.evaluate(good.id, {"x": np.ones(3)})["out"].tolist() == [1.0] * 3
        # registering over a link or a FIFO replaces it with the graph's file; the link's target is left alone
        for g, k in ((linked, 4.0), (fifo, 2.0)):
            assert remote.evaluate(g, {"x": np.ones(3)})["out"].tolist() == [k] * 3
            assert (graphs / f"{g.id}.pb").is_file() and not (graphs / f"{g.id}.pb").is_symlink()
        assert outside.read_bytes() == wire(linked)
        err = rpc_error(st.RegisterGraph, pb.RegisterGraphRequest(graph=folder.to_proto()), timeout=5)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "directory" in err.details()
        assert st.DeleteGraph(pb.DeleteGraphRequest(graph_id=folder.id), timeout=5).deleted is False
        assert (graphs / f"{folder.id}.pb").is_dir()  # an operator's folder is left alone
        assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
    logged = caplog.text
    for what in (f"{fifo.id}.pb is a FIFO", "stray-fifo is a FIFO", f"{folder.id}.pb is a directory",
                 f"{linked.id}.pb is a symbolic link", "removed", "stale"):
        assert what in logged, what


# ---------------------------------------------------------------- 4: health Watch streams are capped


def test_health_watch_streams_are_capped_and_hold_no_thread(serve_in_process):
    """More Watch streams than server threads (2 + 1 for waiting calls) leave every call
    answering; past --max-health-watchers a Watch is RESOURCE_EXHAUSTED, and a stream that ends
    gives its slot back."""
    server = serve_in_process(threads=2, max_watchers=1, max_health_watchers=6, metrics_port=0)
    with channel(address(server)) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(6)]
        try:
            for w in watches:
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            start = time.monotonic()
            assert health_status(ch, timeout=3) == health_pb2.HealthCheckResponse.SERVING
            stub(ch).ListGraphs(pb.ListGraphsRequest(), timeout=3)
            assert time.monotonic() - start < 3
            err = rpc_error(next, health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
            assert err.code() == RESOURCE_EXHAUSTED and "--max-health-watchers" in err.details()
            assert metric(parse_metrics(scrape(server.metrics_port)), "gradserve_health_watchers") == 6
            watches.pop().cancel()
            assert wait_until(lambda: server.health.watchers.held == 5, timeout=5)
            again = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            watches.append(again)
            assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for w in watches:
                w.cancel()
        assert wait_until(lambda: server.health.watchers.held == 0, timeout=5)


# ---------------------------------------------------------------- 5: Job.wait when no stream is free


def test_job_wait_polls_when_the_server_has_no_room_for_another_stream(serve_in_process):
    server = serve_in_process(max_watchers=1)
    with gs.connect(address(server), timeout=30) as remote, channel(address(server)) as ch:
        long = remote.minimize(lambda w: gs.sum(w ** 2), np.ones(3), optimizer=optim.Adam(lr=1e-6), steps=10**7)
        held = stub(ch).WatchJob(pb.WatchJobRequest(job_id=long.id), timeout=60)
        try:
            assert wait_until(lambda: server.jobs.waiting == 1, timeout=10)
            short = remote.minimize(lambda w: gs.sum(w ** 2), np.ones(3), optimizer=optim.Adam(lr=0.1), steps=300)
            err = rpc_error(next, stub(ch).WatchJob(pb.WatchJobRequest(job_id=short.id), timeout=10))
            assert err.code() == RESOURCE_EXHAUSTED  # what wait meets: it polls instead
            assert short.wait(timeout=30).status == "succeeded"
            assert short.result().nit == 300
            with pytest.raises(rm.RemoteDeadlineExceeded):
                long.wait(timeout=0.5)  # the deadline still holds while polling
        finally:
            held.cancel()
            long.cancel()


def test_servers_sharing_a_store_follow_each_others_deletes(tmp_path):
    """Two registries on one store (the processes of --processes): a graph one deletes is no
    longer served by the other, and registering it again through the other writes its file."""
    g = gs.trace(lambda x: gs.sum(gs.sin(x)), np.ones(3))
    wire = g.to_proto().SerializeToString(deterministic=True)
    a, b = GraphRegistry(1 << 20, store=tmp_path), GraphRegistry(1 << 20, store=tmp_path)
    a.register(g, wire)
    assert b.get(g.id).id == g.id  # read from the store, now in b's memory
    assert a.delete(g.id)
    with pytest.raises(NotFound):
        b.get(g.id)
    assert b.register(g, wire) == (g.id, True)
    assert (tmp_path / "graphs" / f"{g.id}.pb").is_file()
    assert a.get(g.id).id == g.id


def test_a_listing_ends_on_its_last_listed_graph_and_reads_a_damaged_file_once(tmp_path, monkeypatch):
    graphs = sorted((gs.trace(lambda x, k=k: gs.sum(x) * float(k), np.ones(2)) for k in range(2)), key=lambda g: g.id)
    reg = GraphRegistry(1 << 20, store=tmp_path)
    for g in graphs:
        reg.register(g, g.to_proto().SerializeToString(deterministic=True))
    for k in range(3):  # damaged files whose ids sort after both graphs
        (tmp_path / "graphs" / f"{'f' * 63}{k}.pb").write_bytes(b"\xff not a graph")
    loads = []
    original = GraphRegistry._load

    def counted(self, gid):
        loads.append(gid)
        return original(self, gid)

    monkeypatch.setattr(GraphRegistry, "_load", counted)
    fresh = GraphRegistry(1 << 20, store=tmp_path)  # nothing in memory: every entry is read from the store
    page, more = fresh.list(None, 2)
    assert [gid for gid, _ in page] == [g.id for g in graphs] and not more  # no empty page after the last graph
    damaged_reads = len([gid for gid in loads if gid.startswith("f" * 63)])
    fresh.list(None, 2)
    assert len([gid for gid in loads if gid.startswith("f" * 63)]) == damaged_reads == 3  # not parsed again
