"""`python -m edgezmq.testbed up|down|status TESTBED.yaml` (also `edgezmq testbed ...` once wired into cli.py)."""

import sys

from .cli import main

sys.exit(main())
