"""Benchmarks cannot rot: every script under bench/ runs here with --smoke (the same code as a
real run at tiny sizes, seconds each), as a subprocess with this environment's PYTHONPATH.

Only exit statuses, the rows a script prints and deterministic counts are asserted, never a
time: the numbers of a smoke run mean nothing. The real runs stay out of the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def smoke(script: str, *args: str, timeout: float = 120) -> str:
    """`python <script> --smoke *args` (`script`: "bench/<name>.py") from the repository root; its
    output (stdout and stderr) once it exited 0. On a timeout the whole process group goes (servers, Ray)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "--smoke", *args], cwd=ROOT, env=os.environ.copy(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} --smoke ran over {timeout:.0f} s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # anything of its own it left behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{out[-4000:]}"
    return out


def assert_rows(out: str, *rows: str) -> None:
    missing = [r for r in rows if r not in out]
    assert not missing, f"missing {missing} in:\n{out[-4000:]}"


def test_every_script_has_a_smoke_test():
    scripts = sorted(p.stem for p in BENCH.glob("*.py"))
    assert scripts, BENCH
    untested = [s for s in scripts if f"test_{s}_smoke" not in globals()]
    assert not untested, f"bench scripts without a --smoke test here: {untested}"


def test_mlp_smoke():
    out = smoke("bench/mlp.py")
    assert_rows(out, "# smoke run:", "float32: gradserve vs PyTorch gradients", "OK (tolerance 1e-10)",
                "| MLP fwd+bwd, float32, median ms |", "| MLP fwd+bwd, float64, median ms |",
                "| peak RSS growth, one step (warm), float64, MiB |", "| peak RSS growth, first call (cold), float32, MiB |",
                "| peak RSS growth, 3 back-to-back steps, float64, MiB |", "| scalar grad `x*y + sin(x)`, float64, µs/call |")


def test_checkpoint_smoke():
    out = smoke("bench/checkpoint.py", "--block", "2")
    assert_rows(out, "smoke run: the numbers mean nothing", "| gradserve | ", "| gradserve, checkpoint | ",
                "| pytorch, checkpoint | ")


def test_service_smoke():
    out = smoke("bench/service.py")
    assert_rows(out, "| echo p50 ms |", "| remote scalar grad p50 ms |", "| local scalar grad p50 ms |",
                "| remote MLP grad p50 ms |", "| local PyTorch MLP grad p50 ms |", "| residual-session VJP call p50 ms |",
                "| remote scalar grad 2 clients calls/s |", "| remote scalar grad / echo (p50) |",
                "| residual VJP / full remote Gradient (MLP) |", "| remote MLP grad, resident params p50 ms |",
                "| remote MLP (resident params) / local PyTorch MLP |", "| put 4 MiB GB/s |", "| get 4 MiB GB/s |",
                "| remote MLP (resident params) / local PyTorch MLP, interleaved |",
                "| call | p50 ms | bytes in per call | bytes out per call |", "| remote MLP grad, resident params |",
                "| transfer (loopback, median) | bytes in | bytes out | ms | GB/s |")
    # bytes are counted, not timed: deterministic. With the parameters resident a call sends x and y
    # and at most 4 KiB more; a 4 MiB put sends its bytes and a few hundred more, the get sends them back
    params = 8 * (24 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10)  # SMOKE_SHAPE's weights and biases, float64
    x_and_y = 8 * (16 * 24 + 16)
    rows = {name: int(b_in.replace(",", "")) for name, b_in in
            re.findall(r"^\| (remote MLP grad(?:, resident params)?) \| [\d.]+ \| ([\d,]+) \| [\d,]+ \|$", out, re.M)}
    full_in, resident_in = rows["remote MLP grad"], rows["remote MLP grad, resident params"]
    assert full_in >= params + x_and_y and resident_in <= x_and_y + 4096, (full_in, resident_in)
    transfer = re.search(r"^\| put 4 MiB \| ([\d,]+) \| ([\d,]+) \|.*\n\| get 4 MiB \| ([\d,]+) \| ([\d,]+) \|", out, re.M)
    assert transfer is not None, out[-3000:]
    put_in, put_out, get_in, get_out = (int(v.replace(",", "")) for v in transfer.groups())
    assert 4 << 20 <= put_in <= (4 << 20) + 4096 and put_out < 1024, (put_in, put_out)
    assert 4 << 20 <= get_out <= (4 << 20) + 4096 and get_in < 1024, (get_in, get_out)


@pytest.mark.ray
def test_scaling_smoke():
    pytest.importorskip("ray")
    out = smoke("bench/scaling.py", timeout=180)
    assert_rows(out, "| workload | in-process s | 1 workers | 2 workers |", "| fan-out (8 MLP gradients) |",
                "| data-parallel MLP step |", "| wide graph (4 x 32^2) |", "seed scalar gradient: engine",
                "| auto (the scheduler's choice) | in-process s | 1 workers | 2 workers |",
                "| bytes moved per call, MB: driver->workers / workers->driver", "| task round trip (scalar gradient) |")


def test_jobs_smoke(tmp_path):
    out = smoke("bench/jobs.py", "--json", str(tmp_path / "jobs.json"))
    assert_rows(out, "| dtype | steps | remote s |", "| float64 | 3 |", "| float32 | 3 |", "target: remote at most 1.1x local")
    result = json.loads((tmp_path / "jobs.json").read_text())
    assert sorted(result["runs"]) == ["float32", "float64"] and result["skipped"] == []
    assert all(r["steps"] == 3 and r["remote"]["status"] == "succeeded" for r in result["runs"].values())


def test_native_smoke():
    """Every part (each choice of --only): the MLP and chain workloads, the threshold sweep, the
    compile times and the softmax cross-entropy's plans. The first run on a machine fills numba's
    kernel cache (a minute or so)."""
    pytest.importorskip("numba")
    out = smoke("bench/native.py", timeout=300)
    assert_rows(out, "# MLP float32: gradients vs PyTorch", "# chain: native plan:", "as fast as on 1 thread",
                "# native compile seconds",
                "#   float64 tanh-vjp:", "| MLP fwd+bwd float32, median ms |", "| MLP fwd+bwd float64, median ms |",
                "| 10-op elementwise chain fwd+bwd float32, median ms |", "# softmax cross-entropy, whole plan:",
                "# softmax cross-entropy, steps other than matmuls:")
    assert "MISMATCH" not in out


def test_gpu_mlp_smoke():
    out = smoke("bench/gpu_mlp.py")
    assert "# smoke run:" in out
    if "# skipped, no GPU here" in out:  # the parts that need no CuPy ran
        assert_rows(out, "CPU plan (the reference) ran, gradients finite", "fused groups")
    else:
        assert_rows(out, "# gradserve GPU plan:", "OK", "# device-resident: median ms:", "# with transfers: median ms:")


def test_load_smoke(tmp_path):
    out = smoke("bench/load.py", "--json", str(tmp_path / "load.json"))
    assert_rows(out, "| round | call | count | p50 ms |", "| 2 | batch_gradient | 20 |", "| errors in all rounds | 0 |")
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["errors"] == 0 and result["completed"] and result["server_tracebacks"] == 0, result
    assert [r["calls"] for r in result["rounds"]] == [100, 100]
    assert result["graphs_registered"] == 4


def test_reliability_smoke():
    report = ROOT / "RELIABILITY.md"
    before = report.read_bytes() if report.exists() else None
    out = smoke("bench/reliability.py", timeout=180)
    assert_rows(out, "| test | what it tried | load held |", "| `bench/load.py` | 4 concurrent clients, 2 rounds of 100",
                "`test_security.py::test_the_scanner_finds_what_it_looks_for`", "2 of 2 tests passed.")
    assert (report.read_bytes() if report.exists() else None) == before, "the smoke run wrote RELIABILITY.md"
