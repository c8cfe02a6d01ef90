"""One meaning per name: no two classes of the package share a name, shared words are defined once,
and the planner imports nothing of the runtime."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import edgezmq

PACKAGE = Path(edgezmq.__file__).parent
# defined in edgezmq/terms.py only
SHARED = ("CLIENT", "GRANULARITIES", "MAX_MICROBATCH", "MAX_THREADS", "MAX_PORT", "MAX_UNITS", "MAX_BYTES",
          "MAX_MBPS", "MAX_LATENCY_MS", "MAX_SECONDS", "MAX_FACTOR")
PLANNER_MAY_IMPORT = ("edgezmq.planner", "edgezmq.terms", "edgezmq.fields", "edgezmq.errors",
                      "edgezmq.argtypes")  # pure, dependency-free


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_two_classes_share_a_name():
    where = defaultdict(list)
    for path, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(path)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}


def test_shared_words_are_defined_once():
    where = defaultdict(list)
    for path, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name) and t.id in SHARED:
                        where[t.id].append(path)
    assert dict(where) == {name: ["terms.py"] for name in SHARED}


def test_the_planner_imports_nothing_of_the_runtime():
    bad = []
    for path, tree in _modules().items():
        if not path.startswith("planner/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("edgezmq"):
                if not node.module.startswith(PLANNER_MAY_IMPORT):
                    bad.append(f"{path}: from {node.module}")
            elif isinstance(node, ast.Import):
                bad += [f"{path}: import {a.name}" for a in node.names
                        if a.name.startswith("edgezmq") and not a.name.startswith(PLANNER_MAY_IMPORT)]
    assert bad == []
