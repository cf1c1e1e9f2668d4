"""The command lines of a gradserve Ray cluster, in one place.

Every process of the compose stack is one of the argv lists below: the Ray head, the Ray workers,
and the server container (which joins the cluster as a Ray node with no CPUs, then becomes
`gradserve serve --ray-address HEAD`). The same functions give

  * deploy/compose.yaml's generated block (`command:`, `environment:`, health checks),
  * deploy/k8s/server.yaml's generated `args:` of the server container,
  * the processes that tests/test_deploy.py starts on 127.0.0.1,

differing only in the values passed (addresses, ports, paths). `python deploy/commands.py --write`
rewrites the generated blocks from this file; `--check` exits 1 when they are stale, and the test
suite fails the same way, so a hand edit of either file cannot drift from what the test runs.

Why the server container runs a Ray node of its own: a Ray driver (`ray.init(address=...)`)
attaches to a raylet on its own machine and fails where there is none, so the server's container
or pod joins the cluster with `--num-cpus=0` (no work is scheduled there) before `exec gradserve`.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

RAY_PORT = 6379  # the head's GCS port
GRPC_PORT = 50051  # the only port published
METRICS_PORT = 9100  # Prometheus text metrics (internal)
HEAD_CPUS = 0  # the head only coordinates: actors go to the workers
WORKER_CPUS = 2  # CPUs of one Ray worker node (compose); its container limit must match
ACTOR_CPUS = 1  # --worker-cpus: CPUs (and BLAS threads) of one gradserve worker actor
STORE = "/var/lib/gradserve"  # --store inside the image (a volume / PersistentVolumeClaim)
HEALTHCHECK = "/opt/gradserve/healthcheck.py"  # deploy/healthcheck.py inside the image

# compose: service names are host names on the compose network; secrets appear under /run/secrets
COMPOSE_HEAD = "ray-head"
COMPOSE_RAY_TOKEN = "/run/secrets/ray_token"
COMPOSE_GRPC_TOKEN = "/run/secrets/gradserve_token"
# Kubernetes: KubeRay names the head's Service `<RayCluster name>-head-svc`
K8S_RAY_CLUSTER = "gradserve-ray"
K8S_HEAD = f"{K8S_RAY_CLUSTER}-head-svc"
K8S_GRPC_TOKEN = "/var/run/secrets/gradserve/token"

DEPLOY = Path(__file__).resolve().parent


def ray_env(token_path: str) -> dict[str, str]:
    """The environment of every Ray process (nodes and the server): Ray's token auth, no usage stats."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path, "RAY_USAGE_STATS_ENABLED": "0"}


def _ip(node_ip: str | None) -> list[str]:
    return [f"--node-ip-address={node_ip}"] if node_ip else []


def head(port: int = RAY_PORT, num_cpus: float = HEAD_CPUS, node_ip: str | None = None) -> list[str]:
    """The Ray head, in the foreground: GCS on `port`, no dashboard."""
    return ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus:g}", "--include-dashboard=false",
            "--disable-usage-stats", *_ip(node_ip)]


def worker(head_address: str, num_cpus: float = WORKER_CPUS, node_ip: str | None = None) -> list[str]:
    """A Ray worker node joining the head at `head_address`, in the foreground."""
    return ["ray", "start", "--block", f"--address={head_address}", f"--num-cpus={num_cpus:g}", "--disable-usage-stats",
            *_ip(node_ip)]


def server_node(head_address: str, node_ip: str | None = None) -> list[str]:
    """The server's own Ray node: no CPUs, started in the background before the server."""
    return ["ray", "start", f"--address={head_address}", "--num-cpus=0", "--disable-usage-stats", *_ip(node_ip)]


def serve(head_address: str, host: str, port: int, store: str, token_file: str, metrics_port: int | None = METRICS_PORT,
          worker_cpus: float = ACTOR_CPUS) -> list[str]:
    """`gradserve serve` joining the cluster by address."""
    # /metrics binds loopback unless told: here Prometheus scrapes it from other pods, on the server's address
    metrics = ["--metrics-port", str(metrics_port), "--metrics-host", host] if metrics_port is not None else []
    return ["gradserve", "serve", "--host", host, "--port", str(port), "--store", store, "--token-file", token_file,
            *metrics, "--ray-address", head_address, "--worker-cpus", f"{worker_cpus:g}"]


def server(head_address: str, host: str, port: int, store: str, token_file: str, metrics_port: int | None = METRICS_PORT,
           worker_cpus: float = ACTOR_CPUS, node_ip: str | None = None) -> list[str]:
    """The server container's command: join the cluster as a CPU-less node, then exec the server."""
    join = shlex.join(server_node(head_address, node_ip))
    exe = shlex.join(serve(head_address, host, port, store, token_file, metrics_port, worker_cpus))
    return ["sh", "-c", f"{join} && exec {exe}"]


def ray_health(head_address: str) -> list[str]:
    """Exit 0 when the head's GCS answers (with the cluster's token)."""
    return ["ray", "health-check", f"--address={head_address}"]


def grpc_health(address: str, script: str = HEALTHCHECK) -> list[str]:
    """Exit 0 when the server at `address` reports SERVING over grpc.health.v1."""
    return ["python", script, address]


# ---------------------------------------------------------------- the generated blocks


def compose_block() -> list[str]:
    """deploy/compose.yaml's generated lines: YAML anchors the services refer to."""
    head_address = f"{COMPOSE_HEAD}:{RAY_PORT}"
    anchors = {
        "ray-env": ray_env(COMPOSE_RAY_TOKEN),
        "head-command": head(),
        "worker-command": worker(head_address),
        "server-command": server(head_address, "0.0.0.0", GRPC_PORT, STORE, COMPOSE_GRPC_TOKEN),
        "ray-healthcheck": ["CMD", *ray_health(head_address)],
        "grpc-healthcheck": ["CMD", *grpc_health(f"127.0.0.1:{GRPC_PORT}")],
    }
    return [f"x-{name}: &{name} {_flow(value)}" for name, value in anchors.items()]


def k8s_server_block() -> list[str]:
    """deploy/k8s/server.yaml's generated `args:` of the server container (the image's entrypoint is tini)."""
    return [f"args: {_flow(server(f'{K8S_HEAD}:{RAY_PORT}', '0.0.0.0', GRPC_PORT, STORE, K8S_GRPC_TOKEN))}"]


def _flow(value: object) -> str:
    text = json.dumps(value)  # JSON is YAML's flow style
    if "$" in text:
        raise ValueError(f"compose would interpolate '$' in {text}")
    return text


BLOCKS = {DEPLOY / "compose.yaml": {"compose": compose_block}, DEPLOY / "k8s" / "server.yaml": {"server-args": k8s_server_block}}


def render(text: str, blocks: dict) -> str:
    """`text` with each `# BEGIN generated: NAME` ... `# END generated: NAME` region rendered anew,
    indented like its BEGIN line."""
    lines, out, k = text.splitlines(keepends=True), [], 0
    seen = set()
    while k < len(lines):
        line = lines[k]
        out.append(line)
        stripped = line.strip()
        if stripped.startswith("# BEGIN generated:"):
            name = stripped.split(":", 1)[1].split()[0]
            if name not in blocks:
                raise ValueError(f"unknown generated block {name!r}")
            end = next((j for j in range(k + 1, len(lines)) if lines[j].strip().startswith(f"# END generated: {name}")), None)
            if end is None:
                raise ValueError(f"generated block {name!r} has no END line")
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}{body}\n" for body in blocks[name]())
            out.append(lines[end])
            seen.add(name)
            k = end
        k += 1
    missing = set(blocks) - seen
    if missing:
        raise ValueError(f"generated blocks missing: {sorted(missing)}")
    return "".join(out)


def stale() -> list[Path]:
    """The files whose generated blocks differ from what this module renders."""
    return [path for path, blocks in BLOCKS.items() if render(path.read_text(), blocks) != path.read_text()]


def main(argv: list[str]) -> int:
    if argv not in (["--write"], ["--check"]):
        print("usage: python deploy/commands.py --write | --check", file=sys.stderr)
        return 2
    paths = stale()
    if argv == ["--write"]:
        for path in paths:
            path.write_text(render(path.read_text(), BLOCKS[path]))
            print(f"rewrote {path}")
        return 0
    for path in paths:
        print(f"{path}: generated block is stale; run python deploy/commands.py --write", file=sys.stderr)
    return 1 if paths else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
