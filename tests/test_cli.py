"""`bayesify report` end to end on small settings, and the report table's formatting."""

from __future__ import annotations

import pytest

from bayesify.cli import main
from bayesify.report import ReportRow, format_table, run_task


def test_report_prints_tables_and_writes_markdown_and_plots(tmp_path, capsys):
    status = main(["report", "--data", "digits,gap", "--methods", "deterministic,mc_dropout",
                   "--epochs", "5", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "## digits (classification)" in out and "## gap (regression)" in out
    for row in ("| deterministic ", "| deterministic + TS", "| mc_dropout ", "| mc_dropout + VS"):
        assert row in out
    markdown = (tmp_path / "report.md").read_text()
    assert "OOD AUROC" in markdown and "cov90" in markdown
    assert (tmp_path / "reliability_digits.png").stat().st_size > 10_000
    assert (tmp_path / "calibration_gap.png").stat().st_size > 10_000


def test_report_numbers_are_sane_for_a_trained_classifier():
    report = run_task("digits", ["deterministic"], epochs=20, progress=False)
    metrics = report.rows[0].metrics
    assert metrics["accuracy"] > 0.9
    # Held-out digit classes are harder to be sure about than test digits.
    assert metrics["ood_auroc"] > 0.6
    # Split conformal sets at 90% cover about 90% of test labels.
    assert 0.8 < metrics["set_coverage"] <= 1.0
    # The Mahalanobis detector on the head features separates the held-out classes too,
    # and the worst class of class-conditional sets is covered (about 30-55 test points
    # per class, so a few standard errors below 90% at most).
    assert 0.6 < metrics["maha_auroc"] <= 1.0
    assert 0.7 < metrics["class_coverage"] <= 1.0
    assert "maha_auroc" not in report.rows[1].metrics  # features do not change with TS


def test_report_rejects_unknown_data_and_methods(capsys):
    assert main(["report", "--data", "mnist", "--out", "", "--no-progress"]) == 2
    assert "`name` must be one of" in capsys.readouterr().err
    assert main(["report", "--data", "gap", "--methods", "nope", "--out", "",
                 "--no-progress"]) == 2
    assert "`methods` has none usable" in capsys.readouterr().err


def test_unknown_subcommand_exits_with_usage_error():
    with pytest.raises(SystemExit, match="2"):
        main(["frobnicate"])


def test_format_table_aligns_columns_and_shows_failures():
    rows = [ReportRow("a", {"x": 0.5}), ReportRow("longer name", {"x": 12345.0}),
            ReportRow("broken", error="ValueError: bad")]
    table = format_table(rows, [("x", "X"), ("y", "Y")]).splitlines()
    assert len({len(line) for line in table[:4]}) == 1
    assert "| 0.5000 " in table[2] and table[2].endswith("| - |")
    assert "1.23e+04" in table[3]
    assert "failed: ValueError: bad" in table[4]
