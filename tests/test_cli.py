"""The `gradserve` command line as people use it: --version, every flag's default in --help, every
`serve` flag also read from its GRADSERVE_<FLAG> environment variable (the command line wins),
one-line errors for bad flags, bad environment values and missing or unusable files, and
`jobs`/`graphs` against a running server (the module's `python -m gradserve_server` process).

Most commands run in this process through `cli.main(argv)`; the two that check what a real
process prints (no traceback, the exit status) run `python -m gradserve_server.cli`."""

from __future__ import annotations

import importlib.metadata
import math
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from service_fixtures import HOST, child_env, metric, parse_metrics, scrape, wait_until

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve_engine.ir import type_str
from gradserve_server.cli import build_parser, main

COMMANDS = ("serve", "jobs", "graphs")


def run_main(capsys, *argv: str) -> tuple[int | str | None, str, str]:
    """(exit status or SystemExit's message, stdout, stderr) of `gradserve ARGV` in this process."""
    try:
        code: int | str | None = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def help_blocks(capsys, command: str) -> dict[str, str]:
    """{flag: its help text, whitespace folded} from `gradserve COMMAND --help`."""
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    blocks: dict[str, str] = {}
    flag = None
    for line in out.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-h, )?(--[a-z-]+)", line)
        if m:
            flag = m[2]
            blocks[flag] = ""
        if flag is not None:
            blocks[flag] += " " + line.strip()
    return {f: " ".join(text.split()) for f, text in blocks.items() if f not in ("--help",)}


def env_var(flag: str) -> str:
    return "GRADSERVE_" + flag[2:].upper().replace("-", "_")


# ---------------------------------------------------------------- version and help


def test_version_comes_from_the_package_metadata(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out == f"gradserve {importlib.metadata.version('gradserve')}\n"
    module = subprocess.run([sys.executable, "-m", "gradserve_server", "--version"], capture_output=True, text=True,
                            timeout=60, env=child_env())
    assert module.returncode == 0 and module.stdout == out, module  # python -m gradserve_server says the same


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_every_flags_default(capsys, command):
    blocks = help_blocks(capsys, command)
    parsed = vars(build_parser().parse_args([command] + (["list"] if command != "serve" else [])))
    assert len(blocks) >= (30 if command == "serve" else 4), blocks
    for flag, text in blocks.items():
        value = parsed[flag[2:].replace("-", "_")]
        shown = "none" if value is None else str(value)
        assert text.endswith(f"(default: {shown})"), (flag, text)


# ---------------------------------------------------------------- GRADSERVE_<FLAG>

# a value for every serve flag, other than its default (a switch: the switch given)
SAMPLES = {"--host": "0.0.0.0", "--port": "8123", "--max-message-mib": "64", "--max-call-mib": "2048",
           "--max-inflight-mib": "4096", "--cache-mib": "128", "--residual-mib": "256", "--residual-ttl": "60.5",
           "--plan-cache-mib": "256", "--residual-sessions": "500",
           "--tensor-store-mib": "512", "--tensor-ttl": "120", "--store": "/var/lib/gradserve",
           "--token-file": "/run/secrets/token", "--tls-cert": "/etc/tls/cert.pem", "--tls-key": "/etc/tls/key.pem",
           "--metrics-port": "9100", "--metrics-host": "0.0.0.0", "--reflection-needs-token": None,
           "--max-concurrent": "32", "--threads": "8", "--max-watchers": "4", "--max-health-watchers": "100",
           "--grace": "3", "--ray": None, "--ray-address": "127.0.0.1:6379", "--workers": "4", "--worker-cpus": "2",
           "--job-runners": "3", "--checkpoint-every": "100", "--checkpoint-seconds": "5", "--job-history": "500",
           "--job-retention-count": "50", "--job-retention-days": "7.5", "--lease-seconds": "30",
           "--store-busy-seconds": "2", "--kernels": "native", "--log-level": "debug",
           "--processes": "4"}


def test_every_serve_flag_is_read_from_its_environment_variable(capsys):
    assert set(SAMPLES) == set(help_blocks(capsys, "serve")), "a serve flag without a sample here (or one too many)"
    defaults = vars(build_parser().parse_args(["serve"]))
    for flag, text in SAMPLES.items():
        dest = flag[2:].replace("-", "_")
        on_command_line = vars(build_parser().parse_args(["serve", flag] + ([text] if text is not None else [])))
        from_env = vars(build_parser({env_var(flag): text or "true"}).parse_args(["serve"]))
        assert from_env == on_command_line, flag
        assert from_env[dest] != defaults[dest], flag


def test_the_command_line_wins_over_the_environment_and_empty_is_unset():
    env = {"GRADSERVE_PORT": "8000", "GRADSERVE_MAX_CALL_MIB": "2048", "GRADSERVE_RAY": "yes", "GRADSERVE_GRACE": "",
           "GRADSERVE_REFLECTION_NEEDS_TOKEN": "off", "GRADSERVE_IN_NETNS": "1"}  # not a flag's: ignored
    args = build_parser(env).parse_args(["serve", "--port", "9000"])
    assert (args.port, args.max_call_mib, args.ray, args.grace, args.reflection_needs_token) == (9000, 2048, True, 10.0,
                                                                                                   False)
    jobs = build_parser(env).parse_args(["jobs", "list"])  # the variables are serve's
    assert jobs.address == "127.0.0.1:50051"


@pytest.mark.parametrize(("variable", "value", "why"), [
    ("GRADSERVE_PORT", "abc", "'abc' is not a whole number"),
    ("GRADSERVE_PORT", "70000", "a port must be from 0 to 65535"),
    ("GRADSERVE_MAX_CALL_MIB", "-5", "it must be at least 1"),
    ("GRADSERVE_GRACE", "nan", "a finite number"),
    ("GRADSERVE_RAY", "maybe", "a switch is one of 1, true"),
    ("GRADSERVE_KERNELS", "cuda", "choose from numpy, native, auto, gpu"),
])
def test_a_bad_environment_value_is_one_line_naming_the_variable(capsys, monkeypatch, variable, value, why):
    monkeypatch.setenv(variable, value)
    code, out, err = run_main(capsys, "serve")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"environment variable {variable}={value!r}" in err and why in err, err


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(("argv", "why"), [
    (["serve", "--port", "99999"], "argument --port: 99999 is out of range"),
    (["serve", "--threads", "0"], "argument --threads: 0 is out of range"),
    (["serve", "--grace", "-1"], "argument --grace: -1 is out of range"),
    (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["jobs", "frobnicate"], "argument action: invalid choice: 'frobnicate'"),
    (["graphs", "list", "--timeout", "0"], "argument --timeout: 0 is out of range"),
])
def test_a_bad_flag_is_one_line(capsys, argv, why):
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and why in err and "--help" in err, err


def test_missing_or_unusable_files_are_one_line(capsys, tmp_path):
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (["serve", "--token-file", str(missing)], f"--token-file {missing}: No such file or directory"),
        (["serve", "--token-file", str(empty)], f"--token-file {empty} is empty"),
        (["serve", "--store", str(garbage)], f"--store {garbage} is not a directory"),
        (["serve", "--tls-cert", str(missing), "--tls-key", str(garbage)], f"--tls-cert {missing}: No such file"),
        (["serve", "--tls-cert", str(garbage), "--tls-key", str(tmp_path)], f"--tls-key {tmp_path}: Is a directory"),
        (["serve", "--tls-cert", str(garbage), "--tls-key", str(garbage)], "are not a PEM certificate chain"),
        (["serve", "--tls-cert", str(garbage)], "--tls-cert and --tls-key go together"),
        (["jobs", "list", "--token-file", str(missing)], f"--token-file {missing}: No such file or directory"),
        (["graphs", "list", "--tls-ca", str(missing)], f"--tls-ca {missing}: No such file or directory"),
    ]
    for argv, why in cases:
        code, _, _ = run_main(capsys, *argv)
        assert isinstance(code, str) and "\n" not in code and code.startswith("gradserve: ") and why in code, (argv, code)


def _gradserve(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradserve_server.cli", *argv], capture_output=True, text=True,
                          env=child_env(), timeout=60)


def test_a_real_process_prints_no_traceback(tmp_path):
    done = _gradserve("serve", "--port", "0", "--token-file", str(tmp_path / "missing"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"gradserve: --token-file {tmp_path / 'missing'}: No such file or directory\n", done.stderr
    with socket.socket() as taken:  # a port in use: grpc's own log line may come first, ours ends it
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _gradserve("serve", "--port", str(port), "--log-level", "error")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"gradserve: cannot start: cannot listen on {HOST}:{port}")


# ---------------------------------------------------------------- graphs and jobs of a running server


def two_inputs(x, n):
    return {"s": gs.sum(gs.sin(x)) * 2.0, "k": n + 1}


def test_graphs_list_show_and_delete(capsys, remote, server):
    graph = gs.trace(two_inputs, np.ones(3), np.arange(2))
    gid = remote.register(graph)
    code, out, _ = run_main(capsys, "graphs", "list", "--address", server.address)
    info = {g.graph_id: g for g in remote.graphs()}[gid]
    assert code == 0 and out.splitlines()[0].split() == ["id", "nodes", "inputs", "outputs", "bytes"]
    row = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}[gid]
    assert row == [str(info.nodes), "2", "2", str(info.bytes)]

    code, out, _ = run_main(capsys, "graphs", "show", gid, "--address", server.address)
    assert code == 0
    lines = out.splitlines()
    assert lines[:4] == [f"graph {gid}", f"  nodes     {len(graph.nodes)}", f"  bytes     {info.bytes}", "  inputs    2"]
    assert lines[4:] == [*(f"    {x.name}  {type_str(x.dtype, x.shape)}" for x in graph.inputs), "  outputs   2",
                         *(f"    {name}  {type_str(*graph.aval(vid))}" for name, vid in graph.outputs)]
    assert "f64[3]" in out and "i64[2]" in out

    code, out, _ = run_main(capsys, "graphs", "delete", gid, "--address", server.address)
    assert code == 0 and out == f"graph {gid} deleted\n"
    code, out, err = run_main(capsys, "graphs", "show", gid, "--address", server.address)
    assert code == 1 and out == "" and err.startswith("gradserve graphs: NOT_FOUND: ") and err.count("\n") == 1
    code, _, err = run_main(capsys, "graphs", "delete", gid, "--address", server.address)
    assert code == 1 and err == f"gradserve graphs: there is no graph {gid}\n"
    code, _, err = run_main(capsys, "graphs", "show", "--address", server.address)
    assert code == 1 and "show needs a graph id" in err


def quick(remote: gs.Session, steps: int, name: str = "") -> rm.Job:
    return remote.minimize(lambda w: gs.sum((w - 1.0) ** 2), np.zeros(3), optimizer=optim.Adam(lr=0.1), steps=steps,
                           name=name)


def test_jobs_list_takes_one_call_per_page_and_no_get_job(capsys, monkeypatch, remote, server):
    for k in range(3):
        quick(remote, 3, name=f"listed {k}").wait(timeout=30)
    total = len(list(remote.job_summaries()))
    monkeypatch.setattr(rm, "LIST_PAGE_SIZE", 2)
    before = parse_metrics(scrape(server.metrics_port))
    code, out, _ = run_main(capsys, "jobs", "list", "--address", server.address)
    after = parse_metrics(scrape(server.metrics_port))
    assert code == 0 and len(out.splitlines()) == total + 1
    assert all(f"listed {k}" in out for k in range(3))
    calls = {m: metric(after, "gradserve_requests_total", method=m, code="OK")
             - metric(before, "gradserve_requests_total", method=m, code="OK") for m in ("ListJobs", "GetJob")}
    assert calls == {"ListJobs": math.ceil(total / 2), "GetJob": 0}, calls


def test_jobs_cancel_of_a_finished_job_says_so_and_fails(capsys, remote, server):
    job = quick(remote, 3).wait(timeout=30)
    code, out, err = run_main(capsys, "jobs", "cancel", job.id, "--address", server.address)
    assert code == 1 and out == ""
    assert err == f"gradserve jobs: job {job.id} has already finished (succeeded): there is nothing to cancel\n"
    assert job.info().status == "succeeded"


def test_jobs_delete(capsys, remote, server):
    done = quick(remote, 3).wait(timeout=30)
    code, out, _ = run_main(capsys, "jobs", "delete", done.id, "--address", server.address)
    assert code == 0 and out == f"job {done.id} deleted\n"
    code, _, err = run_main(capsys, "jobs", "delete", done.id, "--address", server.address)
    assert code == 1 and err == f"gradserve jobs: there is no job {done.id}\n"

    endless = quick(remote, 10**9)
    try:
        assert wait_until(lambda: endless.info().step > 0, timeout=30)
        code, _, err = run_main(capsys, "jobs", "delete", endless.id, "--address", server.address)
        assert code == 1 and err.startswith("gradserve jobs: FAILED_PRECONDITION: ") and err.count("\n") == 1
        assert err.rstrip().endswith(f"(gradserve jobs cancel {endless.id})"), err
        code, out, _ = run_main(capsys, "jobs", "cancel", endless.id, "--address", server.address)
        assert code == 0 and "status    cancelled" in out
    finally:
        endless.cancel()
    code, out, _ = run_main(capsys, "jobs", "delete", endless.id, "--address", server.address)
    assert code == 0 and out == f"job {endless.id} deleted\n"


def test_a_switch_from_the_environment_is_turned_off_on_the_command_line_and_clients_read_the_token_file(
        tmp_path, monkeypatch):
    assert build_parser({"GRADSERVE_RAY": "1"}).parse_args(["serve", "--no-ray"]).ray is False
    assert build_parser({"GRADSERVE_RAY": "1"}).parse_args(["serve"]).ray is True
    token = tmp_path / "token"
    token.write_text("secret\n")
    monkeypatch.setenv("GRADSERVE_TOKEN_FILE", str(token))
    assert build_parser().parse_args(["jobs", "list"]).token_file == token
