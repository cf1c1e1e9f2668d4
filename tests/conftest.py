"""Keep every test on loopback: outside a loopback-only network namespace, the suite re-runs
itself inside one (`unshare -n`), so nothing it starts (servers, Ray) can reach another address.
Where that is impossible (not root, no `unshare`), tests that start Ray are skipped with the
command to run instead; Ray probes outside addresses whatever it is told."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

RAY_REASON = "Ray tests run only in a loopback-only network namespace: unshare -n sh -c 'ip link set lo up && pytest'"


def loopback_only() -> bool:
    """True when this process's network namespace has no interface but lo."""
    try:
        with open("/proc/net/dev") as f:
            names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    except OSError:
        return False
    return names == ["lo"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz", action="store_true", default=False,
                     help="run the long fuzzing campaigns (at least 10,000 cases each) instead of the fast subset")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: starts Ray (needs a loopback-only network namespace)")
    if loopback_only() or os.environ.get("GRADSERVE_IN_NETNS") or os.geteuid() != 0:
        return
    if shutil.which("unshare") and shutil.which("ip"):
        os.environ["GRADSERVE_IN_NETNS"] = "1"
        sys.stdout.flush()
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                              sys.executable, "-m", "pytest", *sys.argv[1:]])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if loopback_only():
        return
    skip = pytest.mark.skip(reason=RAY_REASON)
    for item in items:
        if "ray" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_pool():
    """A local Ray (2 CPUs) with two single-threaded worker actors, shared by the Ray tests."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from gradserve_engine.pool import RayPool

    pool = RayPool(2, cpus=1, blas_threads=1)
    yield pool
    pool.shutdown()
    ray.shutdown()


# ---------------------------------------------------------------- servers and their clients, for every test module


@pytest.fixture(scope="session", autouse=True)
def _no_proxy():
    """Every channel of this process goes straight to 127.0.0.1, whatever the environment says."""
    from service_fixtures import _NO_PROXY, _PROXY_VARS

    with pytest.MonkeyPatch.context() as mp:
        for k in _PROXY_VARS:
            mp.delenv(k, raising=False)
        for k, v in _NO_PROXY.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def server():
    """A `python -m gradserve_server` process shared by the tests of a module, with a metrics port."""
    from service_fixtures import ServerProcess

    with ServerProcess("--metrics-port", "0") as s:
        yield s


@pytest.fixture(scope="module")
def remote(server):
    """An SDK session with the module's server."""
    import gradserve as gs

    with gs.connect(server.address, timeout=60) as r:
        yield r


@pytest.fixture(scope="module")
def chan(server):
    """A bare channel to the module's server."""
    from service_fixtures import channel

    with channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def bare(chan):
    """A bare GradientService stub on `chan`."""
    from service_fixtures import stub

    return stub(chan)


@pytest.fixture
def serve_in_process():
    """`serve_in_process(engine=None, **config)`: a started in-process Server on 127.0.0.1 (a free
    port) over `engine` (default: the server's own), for tests that reach into it; all stop at the end."""
    from gradserve_server.app import Config, Server

    started = []

    def start(engine=None, **config):
        server = Server(Config(host="127.0.0.1", port=0, **config), engine).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)
