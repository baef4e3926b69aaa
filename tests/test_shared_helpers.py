"""The CAMAL helpers are copied (CleanRL's way), never imported: every copy must match the original."""
import ast

from conftest import ROOT

SHARED = ("grad_cam", "camal_terms", "camal_loss", "attention_iou")
ORIGIN = "ppo_camal_vizdoom.py"


def top_level_functions(path):
    source = path.read_text()
    tree = ast.parse(source)
    return {n.name: ast.get_source_segment(source, n) for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_origin_defines_every_helper():
    assert set(SHARED) <= set(top_level_functions(ROOT / ORIGIN))


def test_copies_are_identical():
    origin = top_level_functions(ROOT / ORIGIN)
    for script in sorted(ROOT.glob("*.py")):
        funcs = top_level_functions(script)
        for name in SHARED:
            if name in funcs:
                assert funcs[name] == origin[name], f"{script.name}: {name} differs from {ORIGIN}; copy it unchanged"
