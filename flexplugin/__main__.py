"""`python -m flexplugin <command> ...`: the `flexplugin` command line (flexplugin/cli/)."""
import sys

from .cli import main

sys.exit(main())
