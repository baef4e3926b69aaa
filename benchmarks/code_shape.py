"""The trainers' shape, measured with ast: how much a reader reads before the method and its loop are done.

    python benchmarks/code_shape.py            # a table of both trainers
    python benchmarks/code_shape.py --json     # the same as JSON

Per trainer: its lines; the lines above the "Run plumbing" banner (Args, the method, the training loop); the training
loop's function, and its loop over iterations or epochs; the plumbing below the banner; the deepest indentation of the
loop's loss line; the loop's calls to the run object; and the lines over 120 characters. docs/code.md keeps the figures
and their targets.
"""

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = {
    "ppo_camal_vizdoom.py": ("main", "loss = pg_loss"),
    "train_dl_camal.py": ("train_fold", "step = train_step"),
}


def shape(path, loop_name, loss_text):
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    banner = next(i for i, line in enumerate(lines, 1) if line.startswith("# Run plumbing"))
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == loop_name)
    loss_line = next(line for line in lines[loop.lineno - 1 : loop.end_lineno] if loss_text in line)
    outer = next(n for n in loop.body if isinstance(n, ast.For))  # the loop over iterations or epochs
    calls = sorted(
        {
            n.func.attr
            for n in ast.walk(loop)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and getattr(n.func.value, "id", "") == "run"
        }
    )
    opens = [n.func.id for n in ast.walk(loop) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Run"]
    return {
        "lines": len(lines),
        "above_banner": banner - 1,
        "loop_function": loop.name,
        "loop_function_lines": loop.end_lineno - loop.lineno + 1,
        "loop_lines": outer.end_lineno - outer.lineno + 1,
        "plumbing": len(lines) - banner + 1,
        "loss_indent": len(loss_line) - len(loss_line.lstrip()),
        "run_calls": opens + calls,
        "lines_over_120": sum(len(line) > 120 for line in lines),
    }


def main():
    result = {name: shape(ROOT / name, *spec) for name, spec in TRAINERS.items()}
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(result, indent=2))
        return
    keys = list(next(iter(result.values())))
    print(f"{'':<24}" + "".join(f"{name:>22}" for name in result))
    for key in keys:
        print(f"{key:<24}" + "".join(f"{str(r[key]):>22}" for r in result.values()))


if __name__ == "__main__":
    main()
