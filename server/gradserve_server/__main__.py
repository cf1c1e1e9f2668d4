"""`python -m gradserve_server [flags]`: the same as `gradserve serve` (and `--version`, as `gradserve --version`)."""

import sys

from .cli import main

args = sys.argv[1:]
sys.exit(main(args if args == ["--version"] else ["serve", *args]))
