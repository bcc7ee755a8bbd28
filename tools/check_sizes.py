"""Size limits of the package's code, run by ``make test``: a module of at most 450 lines, a
function (or method) of at most 60, counted from its ``def`` line to its last line.

The limits keep a module readable in one sitting and a function on one screen. A module or
function may pass them only when it is listed in ``ALLOWED`` with its current size and the reason
it is whole: the list can only shrink, and an entry that grows fails as well.

Usage: ``python tools/check_sizes.py [ROOT ...]`` (default ``src``); exit code 1 on a violation.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60

#: "path" or "path::qualified.name" → the most lines it may have (its size when it was listed).
ALLOWED: dict[str, int] = {
    # The training loop: build, step, report, save and stop on a signal, read top to bottom.
    "src/ps3/train/loop.py": 470,
    # S2's multi-scale forward keeps upstream's argument checks beside the loop over scales.
    "src/ps3/s2.py::multiscale_forward": 63,
}


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def violations(root: Path, base: Path) -> list[str]:
    """Every module and function under ``root`` over its limit (paths relative to ``base``)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.resolve().relative_to(base).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        limit = ALLOWED.get(rel, MAX_MODULE_LINES)
        if lines > limit:
            found.append(f"{rel}: {lines} lines (limit {limit})")
        for name, size in _functions(ast.parse(text, filename=str(path))):
            limit = ALLOWED.get(f"{rel}::{name}", MAX_FUNCTION_LINES)
            if size > limit:
                found.append(f"{rel}::{name}: {size} lines (limit {limit})")
    return found


def main(argv: list[str]) -> int:
    base = Path(__file__).resolve().parents[1]
    roots = [Path(a) for a in argv] or [base / "src"]
    found = [v for root in roots for v in violations(root.resolve(), base)]
    for line in found:
        print(f"check_sizes: {line}", file=sys.stderr)
    if found:
        print(f"check_sizes: split the code, or list it in ALLOWED in {Path(__file__).name} with the reason it is "
              "whole", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
