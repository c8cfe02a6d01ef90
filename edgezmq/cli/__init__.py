"""The ``edgezmq`` command line, one module per command group."""

from edgezmq.cli.main import main

__all__ = ["main"]
