"""Project-level invariants: layering, registries in sync, README complete."""

from __future__ import annotations

import ast
from pathlib import Path

from runtime import config, policies

ROOT = Path(__file__).resolve().parents[2]


def test_ipc_never_imports_runtime():
    offenders = []
    for path in (ROOT / "ipc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n == "runtime" or n.startswith("runtime.")
            ]
    assert offenders == []


def test_config_policy_names_match_the_registries():
    assert set(config.FAIRNESS_NAMES) == set(policies.FAIRNESS)
    assert set(config.ORDERING_NAMES) == set(policies.ORDERING)


def test_readme_documents_every_variable_and_both_commands():
    readme = (ROOT / "README.md").read_text()
    every = (*config.VARIABLES, *config.other_commands_variables())
    missing = [v.name for v in every if f"`{v.name}`" not in readme]
    assert missing == []
    assert "scripts/serve" in readme and "scripts/test" in readme


def test_every_variable_read_by_the_code_is_declared():
    declared = {v.name for v in (*config.VARIABLES, *config.other_commands_variables())}
    used = set()
    for path in [*(ROOT / "runtime").rglob("*.py"), *(ROOT / "ipc").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("BANDGATE_")
            ):
                name = node.value.split("=")[0].split(" ")[0].rstrip(":,.)'")
                if name.isupper() and name != "BANDGATE_":
                    used.add(name)
    assert used - declared == set()
