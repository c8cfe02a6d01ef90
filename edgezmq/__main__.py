"""`python -m edgezmq` == the `edgezmq` console script."""

import sys

from .cli import main

sys.exit(main())
