"""`python -m gradserve_server [flags]`: the same as `gradserve serve`."""

import sys

from .cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
