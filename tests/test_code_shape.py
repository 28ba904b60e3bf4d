"""The code keeps a readable shape: no function in ``ldm/`` or ``pipelines/`` is longer than a reader holds at once."""

import ast

from conftest import ROOT

# A function a reader holds in their head: longer ones are split into named steps.
MAX_FUNCTION_LINES = 80


def long_functions(folder: str) -> list[str]:
    """``path:line name length`` of every function (methods and nested ones too) longer than the limit, from its
    ``def`` to its last line."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    return found


def test_no_function_is_longer_than_the_limit():
    offenders = long_functions("ldm") + long_functions("pipelines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
