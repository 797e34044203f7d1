"""The benchmark runner: every method's fit/transform/score path on a quick zoo, the report schema, the CLI."""

import json

import pytest

from momaestimator.bench.__main__ import main
from momaestimator.bench.methods import METHODS
from momaestimator.bench.report import format_table, write_report
from momaestimator.bench.run import few_shot_indices, run_benchmark
from momaestimator.bench.zoo import build_zoo, quick_config

TASKS = ["digits", "faces"]
METHOD_KEYS = {"per_task", "mean", "normalized_mean", "extra_params", "fit_seconds", "peak_memory_mb"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(TASKS, seed=0, config=quick_config(), cache_dir=tmp_path_factory.mktemp("zoo"), verbose=False)


@pytest.fixture(scope="module")
def report(zoo):
    return run_benchmark(zoo, seeds=(0, 1), n_steps=3, samples_per_class=3, log=lambda *a: None)


def test_every_method_runs_and_the_report_has_the_documented_schema(report):
    assert set(report) >= {"protocol", "tasks", "regime", "methods"}
    assert report["tasks"] == TASKS
    assert set(report["regime"]) >= {"pretrained", "task_arithmetic", "lambda", "individual", "recovered_fraction"}
    assert list(report["methods"]) == list(METHODS)
    for name, row in report["methods"].items():
        assert METHOD_KEYS <= set(row), name
        assert set(row["per_task"]) == set(TASKS)
        assert all(0 <= v <= 100 for v in row["per_task"].values())
        assert row["mean"] == pytest.approx(sum(row["per_task"].values()) / len(TASKS))
        assert set(row["std"]) >= {"mean", "normalized_mean"}  # two seeds: mean ± std
    assert report["methods"]["individual"]["normalized_mean"] == pytest.approx(100.0)
    assert report["methods"]["surgery"]["extra_params"] > 0
    zero = [m for m in METHODS if m not in ("individual", "surgery")]
    assert all(report["methods"][m]["extra_params"] == 0 for m in zero)
    assert report["protocol"]["transductive"] is False and report["protocol"]["samples_per_class"] == 3


def test_regime_numbers_are_the_rows_of_the_table(report):
    g, m = report["regime"], report["methods"]
    assert g["pretrained"] == pytest.approx(m["pretrained"]["mean"])
    assert g["individual"] == pytest.approx(m["individual"]["mean"])
    gap = g["individual"] - g["pretrained"]
    assert g["recovered_fraction"] == pytest.approx((g["task_arithmetic"] - g["pretrained"]) / gap)


def test_write_report_produces_markdown_json_and_plots(report, tmp_path):
    paths = write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["tasks"] == TASKS
    md = (tmp_path / "report.md").read_text()
    assert "MOMA (TA base)" in md and "recovers" in md
    for key in ("per_task_png", "loss_png"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert format_table(report).count("\n") == len(METHODS) + 1


def test_transductive_protocol_fits_on_test_inputs(zoo):
    rep = run_benchmark(zoo, methods=["moma"], n_steps=2, transductive=True, analysis=False, log=lambda *a: None)
    assert rep["protocol"]["transductive"] is True and "test" in rep["protocol"]["fit_data"]


def test_few_shot_sample_is_class_balanced_and_seeded():
    import torch

    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    idx = few_shot_indices(y, 4, seed=0)
    assert sorted(y[idx].tolist()) == [0] * 4 + [1] * 4 + [2] * 3
    assert (few_shot_indices(y, 4, seed=0) == idx).all() and not (few_shot_indices(y, 4, seed=1) == idx).all()


def test_cli_quick_run_writes_the_report(tmp_path, capsys):
    rc = main(
        [
            "--quick",
            "--tasks",
            *TASKS,
            "--methods",
            "pretrained",
            "task_arithmetic",
            "moma",
            "--n-steps",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-analysis",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "regime:" in out and "MOMA (TA base)" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["methods"].keys() == {
        "pretrained",
        "task_arithmetic",
        "moma",
    }


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--seeds", "-1"], "--seeds: expected an integer in"),
        (["--seeds", "0", "0"], "--seeds must be distinct"),
        (["--samples-per-class", "0"], "--samples-per-class: expected an integer in"),
        (["--n-steps", "-5"], "--n-steps: expected an integer in"),
        (["--zoo-seed", "x"], "--zoo-seed: expected an integer, got 'x'"),
        (["--tasks", "bogus"], "--tasks: invalid choice: 'bogus'"),
        (["--device", "gpu"], "--device: unknown device 'gpu'"),
    ],
)
def test_cli_refuses_bad_arguments_before_building_anything(argv, match, capsys, monkeypatch):
    from momaestimator.bench import __main__ as cli
    from momaestimator.bench import zoo as zoo_module

    monkeypatch.setattr(zoo_module, "build_zoo", lambda *a, **k: pytest.fail("the zoo was built"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_the_spread_over_seeds_is_the_sample_standard_deviation():
    from momaestimator.bench.run import _aggregate

    rows = [{"per_task": {"a": v}, "mean": v, "normalized_mean": v, "extra_params": 0, "fit_seconds": 1.0,
             "peak_memory_mb": 0.0} for v in (1.0, 3.0)]  # fmt: skip
    out = _aggregate(rows)
    assert out["mean"] == 2.0 and out["std"]["mean"] == pytest.approx(2**0.5)  # ddof=1, not 1.0
    assert out["std"]["per_task"]["a"] == pytest.approx(2**0.5)


def test_the_report_shows_the_step_early_stopping_kept_for_each_seed(report, tmp_path):
    moma = report["methods"]["moma"]
    assert moma["kept_step"] == [s["kept_step"] for s in moma["seeds"]] and len(moma["kept_step"]) == 2
    assert all(0 <= k <= 3 for k in moma["kept_step"])  # n_steps=3: 0 is the starting merge
    assert "kept_step" not in report["methods"]["task_arithmetic"]
    line = next(x for x in format_table(report).splitlines() if x.startswith("MOMA (TA base)"))
    assert "/".join(map(str, moma["kept_step"])) in line
    ta_line = next(x for x in format_table(report).splitlines() if x.startswith("Task Arithmetic"))
    assert " - " in ta_line
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "kept step" in md and "zoo seed" in md


def test_fit_seconds_over_seeds_is_the_median():
    from momaestimator.bench.run import _aggregate

    rows = [{"per_task": {"a": 1.0}, "mean": 1.0, "normalized_mean": 1.0, "extra_params": 0, "fit_seconds": s,
             "peak_memory_mb": 0.0} for s in (7.0, 209.0, 8.0)]  # fmt: skip
    assert _aggregate(rows)["fit_seconds"] == 8.0
