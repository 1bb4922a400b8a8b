"""`python -m flexplugin.cli <command> ...`: the same as `flexplugin <command> ...`."""
import sys

from . import main

sys.exit(main())
