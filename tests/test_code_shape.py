"""The code's shape as the project keeps it: no function over 60 lines, in the package or in csrc/."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def python_functions(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


# A C function: a line at column 0 that opens a parameter list and ends with "{" (possibly a few lines on),
# up to the next "}" at column 0.
_C_START = re.compile(r"^[A-Za-z_].*\(")


def c_functions(text: str):
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if _C_START.match(lines[i]) and not lines[i].rstrip().endswith(";"):
            j = i
            while j < len(lines) and not lines[j].rstrip().endswith(("{", ";")) and j - i < 4:
                j += 1
            if j < len(lines) and lines[j].rstrip().endswith("{"):
                end = next(k for k in range(j, len(lines)) if lines[k].startswith("}"))
                yield lines[i].split("(")[0].split()[-1], end - i + 1
                i = end
        i += 1


def test_no_python_function_over_60_lines():
    long = [f"{p.relative_to(ROOT)}: {name} ({n} lines)" for p in sorted((ROOT / "pyggml_resnet").rglob("*.py"))
            for name, n in python_functions(p.read_text(encoding="utf-8")) if n > MAX_LINES]
    assert not long, long


def test_no_c_function_over_60_lines():
    files = sorted((ROOT / "csrc").glob("*.[ch]")) + sorted((ROOT / "csrc").glob("*.inc"))
    long = [f"{p.name}: {name} ({n} lines)" for p in files for name, n in c_functions(p.read_text()) if n > MAX_LINES]
    assert not long, long


def test_the_scanners_see_long_functions():
    body = "\n".join(f"    x += {i};" for i in range(MAX_LINES))
    assert list(c_functions(f"static int f(int x,\n           int y) {{\n{body}\n}}\n")) == [("f", MAX_LINES + 3)]
    tmp = "def f():\n" + "\n".join(f"    x = {i}" for i in range(3))
    assert list(c_functions("int g(void);\n")) == []
    assert list(python_functions(tmp)) == [("f", 4)]
