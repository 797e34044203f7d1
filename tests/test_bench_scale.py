"""The scale script end to end on a small open_clip architecture (ViT-S/32, random weights)."""

import json

import pytest

from momaestimator.bench import scale


def test_scale_script_prints_every_row_and_the_target_summary(tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = ["--model", "ViT-S-32", "--tasks", "1", "2", "--n-steps", "3", "--batch-size", "1"]
    argv += ["--methods", "moma", "--task-batching", "sequential", "joint", "--in-process", "--out", str(out)]
    assert scale.main(argv) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["n_tasks"], r["method"]) for r in rows] == [
        (1, "moma[sequential]"),
        (1, "moma[joint]"),
        (2, "moma[sequential]"),
        (2, "moma[joint]"),
    ]
    for r in rows:
        assert "error" not in r, r
        assert r["encoder_params"] > 20_000_000  # a real ViT-S/32 tower
        assert r["seconds_per_step"] > 0 and r["floor_seconds"] > 0
        assert r["step_over_floor"] == r["seconds_per_step"] / r["floor_seconds"]
        assert 0 < r["floor_min_seconds"] <= r["floor_seconds"]  # the median of the repeats, not the fastest
        assert r["peak_over_param_bytes"] * 4 * r["encoder_params"] == pytest.approx(r["peak_extra_mb"] * 2**20)
        assert r["memory"] == "RSS"
        assert r["step_over_pass_floor"] == r["seconds_per_step"] / r["pass_floor_seconds"]
        one_pass = r["method"] == "moma[joint]" or r["n_tasks"] == 1
        # one pass: the same floor; two passes of one sample each: a separate measurement
        assert (r["pass_floor_seconds"] == r["floor_seconds"]) == one_pass
    assert "moma[sequential]: peak(T=2) / peak(T=1) = " in text
    assert "x the fastest floor repeat)" in text
    assert text.count("× floor") == 4 and text.count("× same passes") == 4


def test_scale_script_reports_a_failing_row_instead_of_stopping(capsys):
    argv = ["--model", "ViT-S-32", "--tasks", "1", "--n-steps", "1", "--batch-size", "1"]
    argv += ["--methods", "moma", "--task-batching", "0", "--in-process"]
    assert scale.main(argv) == 0
    assert "ERROR" in capsys.readouterr().out


def test_scale_script_micro_batch_rows_are_labelled_and_floored_on_their_own_passes(tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = ["--model", "ViT-S-32", "--tasks", "1", "--n-steps", "2", "--batch-size", "2", "--methods", "moma"]
    argv += ["--task-batching", "joint", "--micro-batch-size", "1", "--in-process", "--out", str(out)]
    assert scale.main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert "error" not in row, row
    assert row["method"] == "moma[joint,mb1]"
    # one task's 2 samples in passes of 1: the "same passes" floor is a separate, two-pass measurement
    assert row["pass_floor_seconds"] != row["floor_seconds"]
    assert "moma[joint,mb1]" in capsys.readouterr().out


def test_scale_script_measures_with_and_without_gradient_checkpointing(tmp_path):
    out = tmp_path / "scale.json"
    argv = ["--model", "ViT-S-32", "--tasks", "1", "--n-steps", "2", "--batch-size", "2", "--methods", "moma"]
    argv += ["--task-batching", "joint", "--gradient-checkpointing", "off", "on", "--in-process", "--out", str(out)]
    assert scale.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["gradient_checkpointing"]) for r in rows] == [
        ("moma[joint]", False),
        ("moma[joint,ckpt]", True),
    ]
    assert all("error" not in r and r["seconds_per_step"] > 0 for r in rows), rows


def test_scale_script_measures_merged_weights_kept_and_recomputed(tmp_path):
    out = tmp_path / "scale.json"
    argv = ["--model", "ViT-S-32", "--tasks", "2", "--n-steps", "2", "--batch-size", "2", "--methods", "moma"]
    argv += ["--task-batching", "sequential", "--gradient-checkpointing", "off", "on"]
    argv += ["--recompute-merged-weights", "off", "on", "--in-process", "--out", str(out)]
    assert scale.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["gradient_checkpointing"], r["recompute_merged_weights"]) for r in rows] == [
        ("moma[sequential]", False, False),
        ("moma[sequential,remerge]", False, True),
        ("moma[sequential,ckpt]", True, False),
        ("moma[sequential,ckpt,remerge]", True, True),
    ]
    assert all("error" not in r and r["seconds_per_step"] > 0 for r in rows), rows
