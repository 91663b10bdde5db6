"""Past a few arguments, keyword-only: no function in `tinysr_diffusers` takes more than 6 positional arguments
(`self` and `cls` not counted), read from the source with `ast`."""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1] / "tinysr_diffusers"
MAX_POSITIONAL = 6


def _positional(node: ast.FunctionDef) -> list[str]:
    names = [argument.arg for argument in (*node.args.posonlyargs, *node.args.args)]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_no_function_takes_more_than_six_positional_arguments():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(_positional(node)) > MAX_POSITIONAL:
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {len(_positional(node))}")
    assert not found, "more than 6 positional arguments:\n" + "\n".join(found)
