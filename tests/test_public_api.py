"""The package's public surface: the names `edgezmq` exports, and one error root for everything it raises on purpose."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import edgezmq
from edgezmq.errors import EXIT_BAD_INPUT, EXIT_FAILED, EdgezmqError

PUBLIC = [
    "EdgezmqError", "__version__",
    "load_plan", "ModelSpec", "deploy", "unload",                  # plan files and deployment
    "load_cluster", "autodeploy", "ResilientPipeline", "LocalCluster",  # inventories, planning, failover, local nodes
    "Budget",                                                      # autodeploy's compression budget
    "Client", "split",                                             # submitting work
    "Node",                                                        # the node daemon, in-process
    "load_problem", "solve",                                       # the planner alone
]
IMPORT_TIMEOUT_S = 60.0

# control flow inside one module, never seen by a caller: outside the root on purpose
INTERNAL = {"edgezmq.planner.search.Timeout", "edgezmq.planner.search.BudgetExceeded",
            # a yaml.YAMLError: read_yaml turns it into the caller's error like any syntax error
            "edgezmq.fields.ExpansionError",
            # a KeyboardInterrupt: SIGTERM takes Ctrl-C's way out (exit 143)
            "edgezmq.interrupts.Terminated",
            # ends a node's job from inside it (cancel, deadline); the job thread catches it
            "edgezmq.node.daemon.JobStopped",
            # ends a shard build that `unload` abandoned; the loader thread catches it
            "edgezmq.node.daemon._LoadAbandoned",
            # a generation step a stage refuses; the compute thread turns it into an error message
            "edgezmq.node.kvcache.GenError",
            # a node died mid-send: the client's stream and the generator fail over and resend
            "edgezmq.client.FailoverNeeded"}

# every error class, with the builtin its callers catch and the exit code it maps to
ERRORS = {
    "edgezmq.protocol.wire.WireError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.protocol.codecs.CodecError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.protocol.control.ControlError": (Exception, EXIT_FAILED),
    "edgezmq.protocol.schema.SchemaError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.transport.nodeclient.JobFailed": (Exception, EXIT_FAILED),
    "edgezmq.transport.nodeclient.JobTimeout": (Exception, EXIT_FAILED),
    "edgezmq.transport.security.KeyFileError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.transport.netprobe.ProbeError": (RuntimeError, EXIT_FAILED),
    "edgezmq.model.chain.ModelError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.model.text.TextModelError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.generation.GenerateError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.model.graph.GraphError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.model.task.TaskError": (RuntimeError, EXIT_FAILED),  # no scikit-learn, not a task checkpoint
    "edgezmq.protocol.model_kwargs.ModelKwargsError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.orchestrate.failover.NodeLost": (RuntimeError, EXIT_FAILED),
    "edgezmq.node.config.NodeConfigError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.node.metrics.MetricsUnavailable": (RuntimeError, EXIT_FAILED),
    "edgezmq.orchestrate.planfile.PlanFileError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.orchestrate.inventory.ClusterError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.orchestrate.deploy.DeployError": (RuntimeError, EXIT_FAILED),
    "edgezmq.orchestrate.compress.CompressionError": (ValueError, EXIT_BAD_INPUT),  # weights, calibration batch
    "edgezmq.client.PipelineError": (RuntimeError, EXIT_FAILED),
    "edgezmq.client.ResultTimeout": (TimeoutError, EXIT_FAILED),
    "edgezmq.orchestrate.local.NodeStartError": (RuntimeError, EXIT_FAILED),
    "edgezmq.ops.status.StatusInputError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.planner.problem.PlanError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.testbed.config.ConfigError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.testbed.errors.TestbedError": (RuntimeError, EXIT_FAILED),
    "edgezmq.testbed.errors.PrerequisiteError": (RuntimeError, EXIT_BAD_INPUT),  # not root / no iproute2
    "edgezmq.cli.args.UsageError": (ValueError, EXIT_BAD_INPUT),
    "edgezmq.cli.args.CommandFailed": (RuntimeError, EXIT_FAILED),
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in the package (imports every module)."""
    found = {}
    for m in pkgutil.walk_packages(edgezmq.__path__, "edgezmq."):
        if m.name.endswith("__main__"):
            continue
        mod = importlib.import_module(m.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_class_is_rooted_and_listed():
    classes = _exception_classes()
    rooted = {name for name, c in classes.items() if issubclass(c, EdgezmqError)} - {"edgezmq.errors.EdgezmqError"}
    assert set(classes) - rooted - {"edgezmq.errors.EdgezmqError"} == INTERNAL  # nothing else escapes the root
    assert rooted == set(ERRORS)  # a new error class gets a line above: its builtin and its exit code


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_mixes_in_its_builtin_and_maps_to_its_exit_code(name):
    module, cls_name = name.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    builtin, code = ERRORS[name]
    assert issubclass(cls, EdgezmqError) and issubclass(cls, builtin)
    err = cls.__new__(cls)  # constructors differ (code, message, seq...); the mapping is the class's
    assert err.exit_code == code


def test_all_is_pinned_and_every_name_resolves():
    assert sorted(edgezmq.__all__) == sorted(PUBLIC) and len(set(edgezmq.__all__)) == len(edgezmq.__all__)
    assert set(edgezmq._LAZY) == set(PUBLIC) - {"EdgezmqError", "__version__"}  # each lazy name is exported
    for name in PUBLIC:
        assert getattr(edgezmq, name) is not None, name
    assert edgezmq.deploy.__module__ == "edgezmq.orchestrate.deploy" and inspect.isfunction(edgezmq.deploy)
    assert edgezmq.Client.__module__ == "edgezmq.client" and inspect.isclass(edgezmq.Client)
    assert set(PUBLIC) <= set(dir(edgezmq))
    with pytest.raises(AttributeError, match="no_such_name"):
        edgezmq.no_such_name  # noqa: B018


@pytest.mark.slow
def test_import_edgezmq_loads_neither_torch_nor_zmq():
    code = ("import sys, edgezmq, edgezmq.planner; "
            "print(sorted(m for m in ('torch', 'timm', 'zmq', 'edgezmq.client') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
