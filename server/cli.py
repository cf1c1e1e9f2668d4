"""The `gradserve` command line."""

from __future__ import annotations

import argparse
import sys


def demo() -> int:
    """The seed's example end to end: trace z = x*y + sin(x), print the graph and its gradients."""
    import numpy as np

    import gradserve as gs

    def f(x, y):
        return x * y + gs.sin(x)

    print(gs.trace(f, 2.0, 3.0))
    gx, gy = gs.grad(f, argnums=(0, 1))(2.0, 3.0)
    print(f"z = {f(np.float64(2.0), 3.0):.6f}")
    print(f"dz/dx = y + cos(x) = {gx:.6f}   (expected {3.0 + np.cos(2.0):.6f})")
    print(f"dz/dy = x          = {gy:.6f}   (expected 2.000000)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradserve", description="Distributed gradient computation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the seed's z = x*y + sin(x) example end to end")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
