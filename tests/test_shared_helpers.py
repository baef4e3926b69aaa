"""Helpers are copied between scripts (CleanRL's way), never imported: every copy must match its original.

python tests/test_shared_helpers.py --sync   # after changing an original: copy it over every copy
"""

import ast
import functools
import sys

from conftest import ROOT

# (origin script, helpers): a script that defines one of these must hold it exactly as the origin does
SHARED = [
    (
        "ppo_camal_vizdoom.py",
        (
            "CAM_KINDS",
            "grad_cam",
            "camal_terms",
            "camal_loss",
            "attention_iou",
            "empty_cams",
            "rng_state",
            "restore_rng",
            "ignored_flags",
            "write_checkpoint",
            "previous_checkpoint",
            "read_checkpoint",
            "read_resume",
            "fits_type",
            "write_json",
            "RunFileError",
            "first_line",
            "WRITE_FAILURES",
            "atomic_write",
            "read_json",
            "read_torch",
            "make_folder",
            "unwritable",
            "state_bytes",
            "start_tracking",
            "StopRequest",
            "attention_panel",
            "describe_device",
            "ENVIRONMENT_PACKAGES",
            "package_version",
            "record_environment",
            "duration",
            "warn",
            "open_logs",
            "close_logs",
        ),
    ),
    ("train_dl_camal.py", ("build_model", "CamModel", "normalise", "MEAN, STD", "class_cam", "MODELS")),
    (
        "train_dl_camal.py",
        (
            "DataError",
            "load_gray",
            "require",
            "pets_records",
            "flowers_records",
            "busi_records",
            "read_mask",
            "render_shape",
            "shapes_records",
            "dataset_records",
            "resize_crop",
            "SHAPE_NAMES",
            "CUE_COLOURS",
            "RESIZE, CROP",
        ),
    ),
    ("eval_faithfulness.py", ("mean_ci", "plot_curves", "correct_by_all", "NORMALISE_FLOOR")),
    ("stats.py", ("DATASET_NAMES",)),
    ("benchmarks/spurious_shapes.py", ("fresh_folder",)),
]


@functools.lru_cache(maxsize=None)  # each script parsed once: get_source_segment re-splits the source on every call
def top_level_definitions(path):
    source = path.read_text()
    tree = ast.parse(source)
    defs = {
        n.name: ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }
    for n in tree.body:  # constants the helpers read, keyed by their target ("RESIZE, CROP")
        if isinstance(n, ast.Assign) and len(n.targets) == 1:
            defs[ast.get_source_segment(source, n.targets[0])] = ast.get_source_segment(source, n)
    return defs


def test_origins_define_their_helpers():
    for origin, names in SHARED:
        assert set(names) <= set(top_level_definitions(ROOT / origin)), origin


def test_copies_are_identical():
    for origin, names in SHARED:
        original = top_level_definitions(ROOT / origin)
        for script in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("benchmarks/*.py")):
            defs = top_level_definitions(script)
            for name in names:
                if name in defs:
                    assert defs[name] == original[name], (
                        f"{script.name}: {name} differs from {origin}; copy it unchanged"
                    )


def test_eval_faithfulness_holds_the_copies():
    defs = top_level_definitions(ROOT / "eval_faithfulness.py")
    assert {"grad_cam", "build_model", "CamModel", "normalise", "MEAN, STD", "class_cam"} <= set(defs)


def test_stats_holds_the_copies():
    assert {"mean_ci", "plot_curves"} <= set(top_level_definitions(ROOT / "stats.py"))


def test_regularizer_study_holds_the_copies():
    defs = top_level_definitions(ROOT / "regularizer_study.py")
    assert {
        "camal_terms",
        "dataset_records",
        "read_mask",
        "render_shape",
        "resize_crop",
        "pets_records",
        "flowers_records",
        "busi_records",
    } <= set(defs)
    assert not {"download_dataset", "fetch", "dataset_files", "mirrored"} & set(defs)  # download.py's, loaded


def test_benchmarks_hold_the_copies():
    assert "fresh_folder" in top_level_definitions(ROOT / "benchmarks" / "drl_alignment.py")


def test_dl_holds_the_checkpoint_copies():
    names = {
        "rng_state",
        "restore_rng",
        "ignored_flags",
        "write_checkpoint",
        "previous_checkpoint",
        "read_checkpoint",
        "read_resume",
        "start_tracking",
    }
    assert names <= set(top_level_definitions(ROOT / "train_dl_camal.py"))


def test_every_json_writer_holds_the_atomic_copy():
    for script in ("train_dl_camal.py", "eval_faithfulness.py", "stats.py", "regularizer_study.py"):
        assert {"write_json", "atomic_write", "RunFileError", "unwritable"} <= set(
            top_level_definitions(ROOT / script)
        ), script
    # every file a run reads goes through one reader
    for script in ("train_dl_camal.py", "eval_faithfulness.py"):
        assert {"read_json", "read_torch"} <= set(top_level_definitions(ROOT / script)), script
    assert "read_json" in top_level_definitions(ROOT / "stats.py")
    assert "unwritable" in top_level_definitions(ROOT / "benchmark.py")
    assert "MODELS" in top_level_definitions(ROOT / "benchmark.py")  # the grids' model axis is the trainer's --model
    assert "CAM_KINDS" in top_level_definitions(ROOT / "benchmark.py")  # and its CAM axis the trainer's --cam
    assert "MODELS" in top_level_definitions(ROOT / "download.py")  # --weights' choices


def definition_lines(source):
    """{name: (first line, last line)} of the top-level definitions and constants, 1-based, decorators included."""
    spans = {}
    for n in ast.parse(source).body:
        first = min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])])
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            spans[n.name] = (first, n.end_lineno)
        elif isinstance(n, ast.Assign) and len(n.targets) == 1:
            spans[ast.get_source_segment(source, n.targets[0])] = (first, n.end_lineno)
    return spans


def sync():
    """Copy every shared helper from its origin over the copies in the other scripts."""
    for origin, names in SHARED:
        source = (ROOT / origin).read_text()
        spans = definition_lines(source)
        lines = source.splitlines(keepends=True)
        texts = {name: "".join(lines[spans[name][0] - 1 : spans[name][1]]) for name in names}
        for script in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("benchmarks/*.py")):
            if script == ROOT / origin:
                continue
            target = script.read_text()
            found = definition_lines(target)
            out = target.splitlines(keepends=True)
            changed = []
            same = top_level_definitions.__wrapped__(script)  # uncached: the files change as they are synced
            # bottom up: lines stay put
            for name in sorted((n for n in names if n in found), key=lambda n: -found[n][0]):
                first, last = found[name]
                if same[name] != top_level_definitions.__wrapped__(ROOT / origin)[name]:
                    out[first - 1 : last] = [texts[name]]
                    changed.append(name)
            if changed:
                script.write_text("".join(out))
                print(f"{script.relative_to(ROOT)}: {', '.join(sorted(changed))} copied from {origin}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--sync"]:
        sys.exit(__doc__)
    sync()
