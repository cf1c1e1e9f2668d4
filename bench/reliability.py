"""Write RELIABILITY.md: what the hardening tests and the load script tried, and what held.

    python bench/reliability.py [--fuzz] [--calls 10000] [--clients 64] [--out PATH]
    python bench/reliability.py --smoke       # SMOKE_TESTS and a small load run, a temporary file (the tests)

Runs the fuzzing, security, fault, job-restart and service tests through pytest (in a
loopback-only network namespace, as the suite always does), then the load script, and writes
the table of its last run to RELIABILITY.md at the top of the repository (or --out). With --fuzz,
the fuzzing campaigns run at least 10,000 cases each instead of the fast subset.

--smoke runs the same code on a tiny subset: the tests in SMOKE_TESTS (fast ones that fill both
columns), `bench/load.py --smoke`, and writes the report to a temporary file that it prints and
removes (RELIABILITY.md is left alone). The exit status is 1 when a test failed, none ran, or
the load run failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = {  # file -> the column its tests fill
    "tests/test_fuzz.py": "bad inputs tried",
    "tests/test_security.py": "bad inputs tried",
    "tests/test_faults.py": "faults survived",
    "tests/test_jobs.py": "faults survived",
    "tests/test_service.py": "bad inputs tried",
    "tests/test_hardening_engine.py": "bad inputs tried",
    "tests/test_hardening_limits.py": "bad inputs tried",
    "tests/test_hardening_jobs.py": "faults survived",
    "tests/test_hardening_store.py": "faults survived",
}
SMOKE_TESTS = (  # --smoke: one fast test per column, each over a second at most
    "tests/test_security.py::test_the_scanner_finds_what_it_looks_for",
    "tests/test_jobs.py::test_damaged_store_refused_at_startup_and_left_alone[garbage]",
)
PLUGIN = '''
import json, pytest
RESULTS = []
def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        RESULTS.append({"nodeid": report.nodeid, "outcome": report.outcome, "seconds": report.duration})
def pytest_collection_modifyitems(items):
    global DOCS
    DOCS = {i.nodeid: ((getattr(i, "function", None) and i.function.__doc__) or "").strip().splitlines()[:1] for i in items}
def pytest_sessionfinish(session):
    import os
    for r in RESULTS:
        r["doc"] = (DOCS.get(r["nodeid"]) or [""])[0]
    with open(os.environ["GRADSERVE_RELIABILITY_OUT"], "w") as f:
        json.dump(RESULTS, f)
'''


def run_tests(fuzz: bool, tests: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "reliability_plugin.py").write_text(PLUGIN)
        out = Path(tmp) / "results.json"
        env = {**__import__("os").environ, "GRADSERVE_RELIABILITY_OUT": str(out),
               "PYTHONPATH": tmp + ":" + __import__("os").environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "reliability_plugin",
               *(["--fuzz"] if fuzz else []), *tests]
        subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        return json.loads(out.read_text())


def run_load(calls: int, clients: int, smoke: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        subprocess.run([sys.executable, "bench/load.py", *(["--smoke"] if smoke else []), "--calls", str(calls),
                        "--clients", str(clients), "--json", str(out)], cwd=ROOT, check=False)
        return json.loads(out.read_text()) if out.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", action="store_true", help="the long fuzzing campaigns (10,000+ cases each)")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default RELIABILITY.md "
                                                                "at the top of the repository)")
    parser.add_argument("--smoke", action="store_true",
                        help="only SMOKE_TESTS and `bench/load.py --smoke` (100 calls, 4 clients), the report to a "
                             "temporary file, printed: the same code in seconds, for the tests")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(calls=100, clients=4)
    args = parser.parse_args(argv)
    tests = list(SMOKE_TESTS) if args.smoke else [s for s in SUITES if (ROOT / s).exists()]
    results = run_tests(args.fuzz, tests)
    load = run_load(args.calls, args.clients, args.smoke)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    flags = (" --fuzz" if args.fuzz else "") + (" --smoke" if args.smoke else "")
    lines = ["# Reliability", "",
             f"What the hardening suites tried and what held, from the last run of `python bench/reliability.py"
             f"{flags}` ({datetime.date.today().isoformat()}, commit {commit}, this project's "
             "2-core machine). Regenerate it with that command.", "",
             "| test | what it tried | load held | faults survived | bad inputs tried | anything lost | result |",
             "|---|---|---|---|---|---|---|"]
    if load:
        rounds, rss = load["rounds"], load["rss_mib"]
        held = load["errors"] == 0 and load["completed"] and not load["server_tracebacks"]
        lines.append(f"| `bench/load.py` | {args.clients} concurrent clients, {len(rounds)} rounds of {args.calls} mixed calls "
                     f"(register, evaluate, gradient, batch) on 127.0.0.1 | {sum(r['calls'] for r in rounds)} calls, "
                     f"{load['errors']} errors; server RSS {rss['before']:.0f} MiB before, "
                     f"{', '.join(f'{v:.0f}' for v in rss['after'])} MiB after each round "
                     f"(+{load['growth_after_round1_mib']:.1f} MiB after round 1) | — | — | nothing | "
                     f"{'held' if held else 'FAILED'} |")
    for r in results:
        path = r["nodeid"].split("::")[0]
        column = SUITES.get(path, "bad inputs tried")
        name = r["nodeid"].split("::", 1)[1]
        cells = {"faults survived": "—", "bad inputs tried": "—"}
        held = r["outcome"] == "passed"
        cells[column] = ("yes" if held else "no") + (" (10,000+ cases)" if args.fuzz and name.startswith("test_fuzz_") else "")
        tried = r["doc"] or name.split("[")[0].removeprefix("test_").replace("_", " ") + (
            f" [{name.split('[', 1)[1]}" if "[" in name else "")
        lines.append(f"| `{path.split('/')[-1]}::{name}` | {tried} | — | {cells['faults survived']} | "
                     f"{cells['bad inputs tried']} | {'nothing' if held else 'see the test'} | "
                     f"{r['outcome']} ({r['seconds']:.1f} s) |")
    passed = sum(r["outcome"] == "passed" for r in results)
    lines += ["", f"{passed} of {len(results)} tests passed."]
    report = "\n".join(lines) + "\n"
    load_held = bool(load) and load["errors"] == 0 and load["completed"] and not load["server_tracebacks"]
    if args.smoke and args.out is None:  # the real report stays as it is: print this one and drop it
        with tempfile.TemporaryDirectory(prefix="gradserve-reliability-") as tmp:
            out = Path(tmp) / "RELIABILITY.md"
            out.write_text(report)
            print(out.read_text(), end="")
            print(f"wrote {out} (removed again, --smoke): {passed}/{len(results)} passed")
    else:
        out = args.out or ROOT / "RELIABILITY.md"
        out.write_text(report)
        print(f"wrote {out}: {passed}/{len(results)} passed")
    if not results:
        print("ERROR: no test ran (a name in the list changed?)", file=sys.stderr)
    if not load_held:
        print("ERROR: the load run failed" + ("" if load else " (no results)"), file=sys.stderr)
    return 0 if results and passed == len(results) and load_held else 1


if __name__ == "__main__":
    sys.exit(main())
