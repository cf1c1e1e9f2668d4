"""Every Python block of README.md runs, in order, in one namespace (as a reader types them into
one session): a name a block uses is defined by it or by a block above it. Blocks that talk to
a server get this module's server in place of README's address, and run in a scratch folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradserve as gs

README = Path(__file__).resolve().parents[1] / "README.md"
ADDRESS = "127.0.0.1:50051"  # README's server address


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)]


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def namespace(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    ns: dict = {"__name__": "readme"}
    before = gs.config()["kernels"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield ns, server.address
    gs.config(kernels=before)  # a block may change the local engine's settings
    remote = ns.get("remote")
    if remote is not None:
        remote.close()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 7, BLOCKS


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(namespace, line, code):
    ns, address = namespace
    exec(compile(code.replace(ADDRESS, address), f"README.md:{line}", "exec"), ns)
