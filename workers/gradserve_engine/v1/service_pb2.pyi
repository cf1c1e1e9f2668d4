from gradserve_engine.v1 import graph_pb2 as _graph_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph",)
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id", "created")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    created: bool
    def __init__(self, graph_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("graph_id", "inputs", "outputs", "keep")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    keep: bool
    def __init__(self, graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., outputs: _Optional[_Iterable[str]] = ..., keep: _Optional[bool] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("outputs",)
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, outputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("graph_id", "inputs", "wrt", "seeds", "outputs", "batch_axes", "keep")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class SeedsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BatchAxesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_AXES_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    seeds: _containers.MessageMap[str, _graph_pb2.Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    batch_axes: _containers.ScalarMap[str, int]
    keep: bool
    def __init__(self, graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., wrt: _Optional[_Iterable[str]] = ..., seeds: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., outputs: _Optional[_Iterable[str]] = ..., batch_axes: _Optional[_Mapping[str, int]] = ..., keep: _Optional[bool] = ...) -> None: ...

class GradientResponse(_message.Message):
    __slots__ = ("outputs", "grads")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    grads: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, outputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., grads: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class JvpRequest(_message.Message):
    __slots__ = ("graph_id", "inputs", "tangents")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    tangents: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., tangents: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class JvpResponse(_message.Message):
    __slots__ = ("outputs", "tangents")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    tangents: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, outputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., tangents: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class InputSet(_message.Message):
    __slots__ = ("inputs", "seeds")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class SeedsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    seeds: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., seeds: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class BatchGradientRequest(_message.Message):
    __slots__ = ("graph_id", "items", "wrt", "outputs", "keep")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    items: _containers.RepeatedCompositeFieldContainer[InputSet]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    keep: bool
    def __init__(self, graph_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[InputSet, _Mapping]]] = ..., wrt: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[str]] = ..., keep: _Optional[bool] = ...) -> None: ...

class BatchGradientResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GradientResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[GradientResponse, _Mapping]]] = ...) -> None: ...

class JacobianRequest(_message.Message):
    __slots__ = ("graph_id", "inputs", "wrt", "outputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., wrt: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class JacobianEntry(_message.Message):
    __slots__ = ("output", "input", "value")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    output: str
    input: str
    value: _graph_pb2.Tensor
    def __init__(self, output: _Optional[str] = ..., input: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...

class JacobianResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[JacobianEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[JacobianEntry, _Mapping]]] = ...) -> None: ...

class HessianRequest(_message.Message):
    __slots__ = ("graph_id", "inputs", "wrt", "output", "vectors")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class VectorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    output: str
    vectors: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., wrt: _Optional[_Iterable[str]] = ..., output: _Optional[str] = ..., vectors: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class HessianResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[JacobianEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[JacobianEntry, _Mapping]]] = ...) -> None: ...

class GraphInfo(_message.Message):
    __slots__ = ("graph_id", "nodes", "bytes", "input_count", "output_count")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_COUNT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COUNT_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    nodes: int
    bytes: int
    input_count: int
    output_count: int
    def __init__(self, graph_id: _Optional[str] = ..., nodes: _Optional[int] = ..., bytes: _Optional[int] = ..., input_count: _Optional[int] = ..., output_count: _Optional[int] = ...) -> None: ...

class ListGraphsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListGraphsResponse(_message.Message):
    __slots__ = ("graphs", "next_page_token")
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    graphs: _containers.RepeatedCompositeFieldContainer[GraphInfo]
    next_page_token: str
    def __init__(self, graphs: _Optional[_Iterable[_Union[GraphInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetGraphRequest(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    def __init__(self, graph_id: _Optional[str] = ...) -> None: ...

class GetGraphResponse(_message.Message):
    __slots__ = ("info", "inputs", "outputs")
    INFO_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    info: GraphInfo
    inputs: _containers.RepeatedCompositeFieldContainer[_graph_pb2.ValueInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[_graph_pb2.ValueInfo]
    def __init__(self, info: _Optional[_Union[GraphInfo, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[_graph_pb2.ValueInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[_graph_pb2.ValueInfo, _Mapping]]] = ...) -> None: ...

class DeleteGraphRequest(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    def __init__(self, graph_id: _Optional[str] = ...) -> None: ...

class DeleteGraphResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class OpenVjpRequest(_message.Message):
    __slots__ = ("graph_id", "inputs", "wrt", "outputs", "ttl_seconds")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    inputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: float
    def __init__(self, graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., wrt: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class OpenVjpResponse(_message.Message):
    __slots__ = ("handle", "outputs", "ttl_seconds", "residual_bytes")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    outputs: _containers.MessageMap[str, _graph_pb2.Tensor]
    ttl_seconds: float
    residual_bytes: int
    def __init__(self, handle: _Optional[str] = ..., outputs: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., ttl_seconds: _Optional[float] = ..., residual_bytes: _Optional[int] = ...) -> None: ...

class CallVjpRequest(_message.Message):
    __slots__ = ("handle", "cotangents", "batched", "keep")
    class CotangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    handle: str
    cotangents: _containers.MessageMap[str, _graph_pb2.Tensor]
    batched: bool
    keep: bool
    def __init__(self, handle: _Optional[str] = ..., cotangents: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., batched: _Optional[bool] = ..., keep: _Optional[bool] = ...) -> None: ...

class CallVjpResponse(_message.Message):
    __slots__ = ("grads",)
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRADS_FIELD_NUMBER: _ClassVar[int]
    grads: _containers.MessageMap[str, _graph_pb2.Tensor]
    def __init__(self, grads: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ...) -> None: ...

class CloseVjpRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class CloseVjpResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("graph_id", "graph", "loss", "params0", "args", "arg_order", "optimizer_json", "steps", "tol", "batch_size", "seed", "batch_axes", "checkpoint_every", "checkpoint_seconds", "name")
    class Params0Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BatchAxesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMS0_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ARG_ORDER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOL_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_AXES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    graph: _graph_pb2.Graph
    loss: str
    params0: _containers.MessageMap[str, _graph_pb2.Tensor]
    args: _containers.MessageMap[str, _graph_pb2.Tensor]
    arg_order: _containers.RepeatedScalarFieldContainer[str]
    optimizer_json: str
    steps: int
    tol: float
    batch_size: int
    seed: int
    batch_axes: _containers.ScalarMap[str, int]
    checkpoint_every: int
    checkpoint_seconds: float
    name: str
    def __init__(self, graph_id: _Optional[str] = ..., graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., loss: _Optional[str] = ..., params0: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., args: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., arg_order: _Optional[_Iterable[str]] = ..., optimizer_json: _Optional[str] = ..., steps: _Optional[int] = ..., tol: _Optional[float] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., batch_axes: _Optional[_Mapping[str, int]] = ..., checkpoint_every: _Optional[int] = ..., checkpoint_seconds: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "name", "status", "step", "steps", "loss", "grad_norm", "message", "created", "updated", "graph_id", "optimizer_json", "checkpoint_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    status: str
    step: int
    steps: int
    loss: float
    grad_norm: float
    message: str
    created: float
    updated: float
    graph_id: str
    optimizer_json: str
    checkpoint_step: int
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., message: _Optional[str] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., graph_id: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "with_params", "with_history")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WITH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    WITH_HISTORY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    with_params: bool
    with_history: bool
    def __init__(self, job_id: _Optional[str] = ..., with_params: _Optional[bool] = ..., with_history: _Optional[bool] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job", "params", "loss", "grad_norm", "fun", "jac", "counts")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class JacEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _graph_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_graph_pb2.Tensor, _Mapping]] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    FUN_FIELD_NUMBER: _ClassVar[int]
    JAC_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    job: Job
    params: _containers.MessageMap[str, _graph_pb2.Tensor]
    loss: _containers.RepeatedScalarFieldContainer[float]
    grad_norm: _containers.RepeatedScalarFieldContainer[float]
    fun: float
    jac: _containers.MessageMap[str, _graph_pb2.Tensor]
    counts: JobCounts
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., params: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., loss: _Optional[_Iterable[float]] = ..., grad_norm: _Optional[_Iterable[float]] = ..., fun: _Optional[float] = ..., jac: _Optional[_Mapping[str, _graph_pb2.Tensor]] = ..., counts: _Optional[_Union[JobCounts, _Mapping]] = ...) -> None: ...

class JobCounts(_message.Message):
    __slots__ = ("nit", "nfev", "status")
    NIT_FIELD_NUMBER: _ClassVar[int]
    NFEV_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    nit: int
    nfev: int
    status: int
    def __init__(self, nit: _Optional[int] = ..., nfev: _Optional[int] = ..., status: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_step: int
    def __init__(self, job_id: _Optional[str] = ..., from_step: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "step", "loss", "grad_norm", "status", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    loss: float
    grad_norm: float
    status: str
    message: str
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("dtype", "shape", "data", "ref")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    dtype: _graph_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    ref: str
    def __init__(self, dtype: _Optional[_Union[_graph_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., ref: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("ref", "dtype", "shape", "bytes", "pinned", "idle_seconds")
    REF_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    dtype: _graph_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    bytes: int
    pinned: bool
    idle_seconds: float
    def __init__(self, ref: _Optional[str] = ..., dtype: _Optional[_Union[_graph_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., idle_seconds: _Optional[float] = ...) -> None: ...

class PutTensorResponse(_message.Message):
    __slots__ = ("tensor", "created")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorInfo
    created: bool
    def __init__(self, tensor: _Optional[_Union[TensorInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetTensorRequest(_message.Message):
    __slots__ = ("ref", "chunk_bytes")
    REF_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ref: str
    chunk_bytes: int
    def __init__(self, ref: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ReleaseTensorRequest(_message.Message):
    __slots__ = ("refs",)
    REFS_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, refs: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseTensorResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class ListTensorsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTensorsResponse(_message.Message):
    __slots__ = ("tensors", "bytes", "max_bytes", "ttl_seconds", "next_page_token")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    bytes: int
    max_bytes: int
    ttl_seconds: float
    next_page_token: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., next_page_token: _Optional[str] = ...) -> None: ...
