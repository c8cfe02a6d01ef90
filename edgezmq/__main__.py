"""`python -m edgezmq` == the `edgezmq` console script."""

import sys

from edgezmq.cli.main import main

sys.exit(main())
