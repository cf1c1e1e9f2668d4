"""Regenerate the protobuf stubs under workers/gradserve_engine/v1 from proto/gradserve/v1/*.proto.

    python proto/generate.py            # rewrite the checked-in stubs
    python proto/generate.py --check    # exit 1 if the checked-in stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
STUB_DIR = ROOT / "workers" / "gradserve_engine" / "v1"
# the stubs live in the engine package (the IR converts graphs to and from the wire form there);
# protoc names imports after the .proto's path, so those are pointed at the engine's package
IMPORT_FROM, IMPORT_TO = "from gradserve.v1 import", "from gradserve_engine.v1 import"


def generate(dest: Path) -> list[Path]:
    """Compile every .proto into `dest` (as gradserve/v1/...) and return the generated files."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "gradserve" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={dest}", f"--pyi_out={dest}", f"--grpc_python_out={dest}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = dest / "gradserve" / "v1"
    files = sorted(p for p in out.iterdir() if p.suffix in (".py", ".pyi"))
    for f in files:
        f.write_text(f.read_text().replace(IMPORT_FROM, IMPORT_TO))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = [f.name for f in files
                 if not (STUB_DIR / f.name).exists() or not filecmp.cmp(f, STUB_DIR / f.name, shallow=False)]
        if args.check:
            if stale:
                print("stale protobuf stubs: " + ", ".join(stale) + " (run: python proto/generate.py)")
                return 1
            return 0
        STUB_DIR.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, STUB_DIR / f.name)
        (STUB_DIR / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
