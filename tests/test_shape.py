"""The shape of the code (issue 23): no function over 80 lines unless a `long:` comment says why, no module over 450."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "skincancer"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450


def offences(source: str, name: str) -> list[str]:
    """`name` (a module's file name) and `name: function` for each limit the source breaks."""
    lines = source.splitlines()
    found = [name] if len(lines) > MAX_FILE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        # the line before the def (or its decorators) or the first body line may say why it is long; a comment
        # opening the body sits just before its first statement
        body = node.body[0].lineno
        said = [lines[first - 2] if first >= 2 else "", lines[body - 2], lines[body - 1]]
        if not any("#" in line and "long:" in line.split("#", 1)[1] for line in said):
            found.append(f"{name}: {node.name}")
    return found


def package_offences() -> list[str]:
    return [o for path in sorted(PACKAGE.rglob("*.py"))
            for o in offences(path.read_text(), str(path.relative_to(PACKAGE)))]


def test_the_check_finds_what_it_should():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_fn = "def long_one():\n" + body
    assert offences(long_fn, "m.py") == ["m.py: long_one"]  # 81 lines
    assert offences("def short():\n" + body[body.index("\n") + 1:], "m.py") == []  # 80 lines
    assert offences("# long: one table, read top to bottom\n" + long_fn, "m.py") == []
    assert offences("def long_one():\n    # long: one table\n" + body, "m.py") == []
    assert offences("# a comment without the word\n" + long_fn, "m.py") == ["m.py: long_one"]
    assert offences('def long_one():\n    """long: in a docstring is no comment"""\n' + body,
                    "m.py") == ["m.py: long_one"]
    assert offences("x = 1\n" * MAX_FILE_LINES, "m.py") == []
    assert offences("x = 1\n" * (MAX_FILE_LINES + 1), "m.py") == ["m.py"]


def test_no_long_functions_or_modules():
    assert package_offences() == []
