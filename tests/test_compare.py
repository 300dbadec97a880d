"""`fedlora compare`: every registered method on one tiny setup, table + plots, resume."""

import csv
import json

import pytest

from fedlora.cli import main
from fedlora.compare import write_report
from fedlora.strategies import METHODS as STRATEGIES

from .conftest import tiny_overrides


def test_compare_every_method_writes_table_plots_and_resumes(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    methods = ",".join(STRATEGIES)
    args = ["compare", *tiny_overrides(tiny_bert_dir, out, federation__rounds=1),
            "--methods", methods, "--seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == list(STRATEGIES)
    for r in rows:
        assert 0 <= float(r["final_accuracy_mean"]) <= 1 and float(r["upload_MB"]) > 0
        assert float(r["total_MB"]) == pytest.approx(float(r["upload_MB"]) + float(r["download_MB"]))
        assert float(r["total_MB"]) > float(r["upload_MB"])  # every method downloads something
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in STRATEGIES)
    for png in ("accuracy_vs_round.png", "accuracy_vs_upload.png", "diagnostics.png"):
        assert (out / png).stat().st_size > 1000
    # every method saw the same split (row for row) and budgets; another seed draws another split
    for seed in (0, 1):
        clients = {(out / f"{m}-seed{seed}" / "clients.json").read_text() for m in STRATEGIES}
        assert len(clients) == 1
    splits = {json.loads((out / f"fslora-seed{s}" / "clients.json").read_text())["split_sha256"] for s in (0, 1)}
    assert len(splits) == 2
    # resume: finished pairs are skipped (their metrics are not rewritten)
    stamp = {m: (out / f"{m}-seed1" / "metrics.jsonl").stat().st_mtime_ns for m in STRATEGIES}
    (out / "fslora-seed1" / "summary.json").unlink()  # as if killed before finishing
    assert main(args) == 0
    for m in STRATEGIES:
        changed = (out / f"{m}-seed1" / "metrics.jsonl").stat().st_mtime_ns != stamp[m]
        assert changed == (m == "fslora"), m
    # a table of one seed shows each value alone: a spread of one draw would be a made-up ± 0.000
    one_seed = write_report(out, list(STRATEGIES), [0]).read_text()
    assert "±" not in one_seed and all(f"| {m} |" in one_seed for m in STRATEGIES)


def test_compare_rejects_unknown_method(tiny_bert_dir, tmp_path, capsys):
    args = ["compare", *tiny_overrides(tiny_bert_dir, tmp_path), "--methods", "fslora,nope", "--quiet"]
    assert main(args) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
