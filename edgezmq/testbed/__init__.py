"""Emulated heterogeneous edge testbed on one machine: namespaces, htb-shaped links, cgroups, nodes.

    from edgezmq.testbed import Testbed
    with Testbed.from_yaml("plans/testbed-hetero.yaml") as tb:   # needs root and iproute2
        print(tb.cluster["nodes"])                                 # == <state_dir>/cluster.yaml
        tb.exec_in_client(["edgezmq", "deploy", "plan.yaml"], check=True)

Modules: ``config`` (TESTBED.yaml, pure), ``net`` (namespaces, bridge, tc), ``cgroups``
(cpu/memory limits, v1 or v2), ``core`` (the Testbed: up/down/status), ``cli``.
See docs/testbed.md.
"""

from .cli import add_cli
from .config import ConfigError, TestbedConfig, load_config, parse_bytes, parse_config
from .errors import PrerequisiteError, TestbedError


def __getattr__(name: str):
    if name == "Testbed":  # lazily: core imports the node module (numpy, zmq)
        from .core import Testbed

        return Testbed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Testbed", "TestbedConfig", "ConfigError", "TestbedError", "PrerequisiteError",
           "load_config", "parse_config", "parse_bytes", "add_cli"]
