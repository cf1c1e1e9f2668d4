"""Helpers for the service tests: real `python -m gradserve_server` processes on 127.0.0.1,
bare stubs, request building, health/reflection probes, metrics scraping and a self-signed
certificate. The fixtures built on them (a shared server per module, its clients, in-process
servers) are in conftest.py."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gradserve_engine.ir import tensor_to_proto
from gradserve_engine.v1 import service_pb2_grpc

HOST = "127.0.0.1"
SERVICE = "gradserve.v1.GradientService"
LISTENING = re.compile(r"gradserve listening on (?P<host>[\d.]+):(?P<port>\d+)(?:, metrics on [\d.]+:(?P<metrics>\d+)/metrics)?")
# Bare channels never go through a proxy, and the servers' environment names none either.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
_NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", "no_grpc_proxy": "127.0.0.1,localhost"}
_PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(_NO_PROXY)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """One `python -m gradserve_server --host 127.0.0.1 --port PORT ...` child process
    (`host=None`: no --host flag, the server's default; `host` is then what it printed).

    The constructor returns once the process printed its `gradserve listening on ...` line,
    so the port (and the metrics port) are known and the server accepts calls."""

    def __init__(self, *args: str, port: int = 0, host: str | None = HOST, startup_timeout: float = 20.0,
                 address_space: int | None = None):
        """`address_space`: the process's limit of virtual memory in bytes (RLIMIT_AS), so that a
        test can drive it out of memory without taking the machine along."""
        bind = ["--host", host] if host is not None else []
        self.args = [sys.executable, "-m", "gradserve_server", *bind, "--port", str(port),
                     "--log-level", "warning", *args]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close(), it outlives this call)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                     env=child_env(), text=True, preexec_fn=limit if address_space else None)
        line = self._first_line(startup_timeout)
        m = LISTENING.search(line)
        if m is None:
            self._fail(f"server did not start: first line {line!r}")
        assert host is None or m["host"] == host, line
        self.first_line = line
        self.host = m["host"]
        self.port = int(m["port"])
        self.metrics_port = int(m["metrics"]) if m["metrics"] else None
        self.address = f"{HOST}:{self.port}"

    def _first_line(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box:
            self._fail(f"server printed nothing in {timeout}s")
        return box[0]

    def _fail(self, why: str) -> None:
        self.kill()
        message = f"{why}; exit status {self.proc.returncode}; stderr:\n{self.stderr()}"
        self._stderr.close()
        raise RuntimeError(message)

    def stderr(self) -> str:
        """What the server logged (still readable after `close`)."""
        if self._stderr.closed:
            return self._stderr_text
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is drained) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for the exit (SIGKILL past `timeout`); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if not self._stderr.closed:
            self._stderr_text = self.stderr()
            self._stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def stub(ch: grpc.Channel) -> service_pb2_grpc.GradientServiceStub:
    return service_pb2_grpc.GradientServiceStub(ch)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The grpc.RpcError that `fn(*args, **kwargs)` raises (failing the test if it returns)."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def fill(field, values):
    """Put named arrays into a request's map of tensors; returns the map."""
    for name, v in values.items():
        tensor_to_proto(np.asarray(v), field[name])
    return field


def health_status(ch: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def scrape(metrics_port: int) -> str:
    # An opener without proxy handlers: the request goes straight to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{HOST}:{metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of (label, value)): value} of the text exposition format, read by
    prometheus_client's parser (a malformed exposition raises)."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(check, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def self_signed_cert(directory: Path) -> tuple[Path, Path, bytes]:
    """A fresh key and self-signed certificate for CN=localhost with SANs localhost and
    127.0.0.1; returns (cert path, key path, cert PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path, cert_pem
