"""How the controller reaches a node daemon: ``NodeAddress``, shared by plan files, inventories and status."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgezmq.transport.security import Curve

__all__ = ["NodeAddress"]


@dataclass(frozen=True)
class NodeAddress:
    """One node: the name it goes by, its control address (``tcp://HOST:PORT``), the torch
    threads a deployment asks of it (None: the node's own setting) and the CurveZMQ client
    that reaches it (None: plaintext; the parsers fill it from a file's ``keys:`` section)."""

    name: str
    control: str
    threads: int | None = None
    curve: Curve | None = field(default=None, repr=False, compare=False)  # holds our secret key
