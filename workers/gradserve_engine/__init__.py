"""gradserve's engine: the IR, the primitive registry, differentiation, passes, plans, kernels,
backends, the scheduler and the Ray worker pool. It imports neither the SDK nor the server."""

from . import ops  # registers every primitive before any other engine module runs

__all__ = ["ops"]
