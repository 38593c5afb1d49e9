"""`python -m benchmarks.retrieval`: the retrieval benchmark's command line (cli.py)."""

import sys

from benchmarks.retrieval.cli import main

sys.exit(main())
