import sys

from benchmarks.lm.cli import main

sys.exit(main())
