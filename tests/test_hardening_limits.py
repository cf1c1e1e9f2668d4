"""Single requests that would take a server's memory, sent to a server running under an
address-space limit (RLIMIT_AS, 2 GiB: about 1.65 GiB above what it maps idle), as a hostile
client would: each is refused or fails cleanly, the process lives on, health stays SERVING and
an ordinary call still answers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from service_fixtures import SERVING, ServerProcess, channel, health_status, rpc_error, stub

import gradserve as gs
from gradserve_engine.ir import Builder, Graph, tensor_to_proto
from gradserve_engine.ops import emit as e
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb

GiB = 1 << 30
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def limited():
    with ServerProcess(address_space=2 * GiB) as s:
        yield s


def _graph(fn, *inputs) -> Graph:
    b = Builder()
    xs = [b.input(name, dtype, shape) for name, dtype, shape in inputs]
    return b.build(list(fn(*xs).items()))


def _evaluate(st, graph: Graph, inputs: dict) -> grpc.RpcError:
    st.RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=30)
    req = pb.EvaluateRequest(graph_id=graph.id)
    for k, v in inputs.items():
        tensor_to_proto(np.asarray(v), req.inputs[k])
    return rpc_error(st.Evaluate, req, timeout=60)


def _alive(server: ServerProcess, ch: grpc.Channel) -> None:
    assert server.proc.poll() is None, server.stderr()[-2000:]
    assert health_status(ch) == SERVING
    with gs.connect(server.address, timeout=30) as r:
        x = np.linspace(0.1, 1.0, 5)
        np.testing.assert_allclose(r.grad(lambda x: gs.sum(gs.sin(x)))(x), np.cos(x))


PROBES = {
    # a 66-byte request whose answer is 2 GiB: refused from the plan's output sizes, before computing
    "answer of 2 GiB": (lambda x: {"out": e.broadcast_to(x, (1 << 28,))}, ("x", "float64", ()), "message limit"),
    # four live 2 GiB intermediates: 8 GiB, over --max-call-mib, refused from the plan's liveness
    "8 GiB live at once": (lambda x: {"out": e.bind("reduce_sum", e.mul(e.add(e.broadcast_to(x, (1 << 28,)), 1.0),
                                                                         e.add(e.broadcast_to(x, (1 << 28,)), 2.0)),
                                                    axes=(0,), keepdims=False)},
                           ("x", "float64", ()), "budget|memory|limit"),
    # 2 GiB within every budget, but more than this process can map: out of memory, RESOURCE_EXHAUSTED
    "2 GiB within the budgets": (lambda x: {"out": e.bind("reduce_max", e.bind("cumsum", e.broadcast_to(x, (1 << 28,)),
                                                                                axis=0, reverse=False),
                                                          axes=(0,), keepdims=False)},
                                 ("x", "float64", ()), "memory"),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_request_that_would_take_the_memory_is_refused_and_the_server_lives(limited, probe):
    fn, inp, words = PROBES[probe]
    with channel(limited.address) as ch:
        err = _evaluate(stub(ch), _graph(fn, inp), {"x": 1.0})
        assert err.code() == RESOURCE_EXHAUSTED, (err.code(), err.details())
        assert any(w in err.details() for w in words.split("|")), err.details()
        _alive(limited, ch)


def test_derived_seeds_of_8_gib_are_refused_and_the_server_lives(limited):
    with gs.connect(limited.address, timeout=60) as r, pytest.raises(gs.RemoteError) as info:
        r.jacobian(lambda x: gs.sin(x))(np.ones(1 << 15))  # seeds: the identity, f64[32768,32768]
    assert info.value.code == RESOURCE_EXHAUSTED
    with channel(limited.address) as ch:
        _alive(limited, ch)


def test_a_30_million_entry_attribute_is_refused_and_the_server_lives(limited):
    msg = graph_pb2.Graph()
    msg.inputs.add(id=0, name="x", dtype=graph_pb2.FLOAT64, shape=[4])
    node = msg.nodes.add(id=1, op="reshape", inputs=[0], dtype=graph_pb2.FLOAT64, shape=[4])
    node.attrs["shape"].ints.values.extend(np.full(30_000_000, 7, dtype=np.int64).tolist())
    msg.outputs.add(name="out", id=1)
    with channel(limited.address) as ch:
        err = rpc_error(stub(ch).RegisterGraph, pb.RegisterGraphRequest(graph=msg), timeout=120)
        assert err.code() in (RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), (err.code(), err.details()[:300])
        _alive(limited, ch)


def test_an_upload_larger_than_the_process_can_hold_is_refused_before_allocation(limited):
    header = graph_pb2.Tensor(dtype=graph_pb2.FLOAT64, shape=[1 << 30]).SerializeToString()  # declares 8 GiB
    with channel(limited.address) as ch:
        put = ch.stream_unary("/gradserve.v1.GradientService/PutTensor", request_serializer=None,
                              response_deserializer=None)
        err = rpc_error(put, iter([header]), timeout=30)
        assert err.code() == RESOURCE_EXHAUSTED, (err.code(), err.details())
        _alive(limited, ch)
