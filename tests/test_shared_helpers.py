"""Helpers are copied between scripts (CleanRL's way), never imported: every copy must match its original."""

import ast
import functools

from conftest import ROOT

# (origin script, helpers): a script that defines one of these must hold it exactly as the origin does
SHARED = [
    (
        "ppo_camal_vizdoom.py",
        (
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
            "FLOWERS_SEGMENTATIONS",
            "LAYOUTS",
            "BUSI_SOURCE",
            "dataset_files",
            "mirrored",
            "fetch",
            "download_dataset",
        ),
    ),
    ("eval_faithfulness.py", ("mean_ci", "plot_curves")),
    ("stats.py", ("DATASET_NAMES",)),
    ("benchmarks/spurious_shapes.py", ("fresh_folder",)),
]


@functools.lru_cache(maxsize=None)  # each script parsed once: get_source_segment re-splits the source on every call
def top_level_definitions(path):
    source = path.read_text()
    tree = ast.parse(source)
    defs = {n.name: ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
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
                    assert defs[name] == original[name], f"{script.name}: {name} differs from {origin}; copy it unchanged"


def test_eval_faithfulness_holds_the_copies():
    defs = top_level_definitions(ROOT / "eval_faithfulness.py")
    assert {"grad_cam", "build_model", "CamModel", "normalise", "MEAN, STD", "class_cam"} <= set(defs)


def test_stats_holds_the_copies():
    assert {"mean_ci", "plot_curves"} <= set(top_level_definitions(ROOT / "stats.py"))


def test_regularizer_study_holds_the_copies():
    defs = top_level_definitions(ROOT / "regularizer_study.py")
    assert {"camal_terms", "dataset_records", "read_mask", "render_shape", "resize_crop", "pets_records", "flowers_records", "busi_records"} <= set(
        defs
    )
    assert {"download_dataset", "fetch", "dataset_files", "mirrored"} <= set(defs)


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
        assert {"write_json", "atomic_write", "RunFileError", "unwritable"} <= set(top_level_definitions(ROOT / script)), script
    # every file a run reads goes through one reader
    for script in ("train_dl_camal.py", "eval_faithfulness.py"):
        assert {"read_json", "read_torch"} <= set(top_level_definitions(ROOT / script)), script
    assert "read_json" in top_level_definitions(ROOT / "stats.py")
    assert "unwritable" in top_level_definitions(ROOT / "benchmark.py")
    assert "MODELS" in top_level_definitions(ROOT / "benchmark.py")  # the grids' model axis is the trainer's --model
