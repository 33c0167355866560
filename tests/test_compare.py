"""`debias compare` and the train-classifier command line: tables from real runs, reuse of finished runs, errors."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from debias.errors import DebiasError
from debias.pipelines.compare import CompareJob, run_compare, run_dir
from debias.pipelines.train_classifier import ClassifierJob
from debias.training.classifier import ClassifierTrainConfig

SPURIOUS = "builtin:spurious?n=400"
TINY = ["--image-size", "32", "--latent-dim", "6", "--width", "8", "--batch-size", "64", "--device", "cpu"]


def base_job(out: Path) -> ClassifierJob:
    return ClassifierJob(
        data=SPURIOUS, label="label", out=out, where=["split=train"], eval_where=["split=test"],
        eval_groups=["colour", "label"], image_size=32, latent_dim=6, width=8,
        train=ClassifierTrainConfig(epochs=1, batch_size=64, device="cpu"), progress=False,
    )


def test_compare_tables_summarise_the_runs(tmp_path):
    out = tmp_path / "cmp"
    job = CompareJob(base=base_job(out), out=out, methods=["none", "jtt"], seeds=[0, 1], progress=False)
    res = run_compare(job)
    for name in ("comparison.md", "comparison.json", "groups_colour.png", "groups_label.png", "groups_colour_x_label.png"):
        assert (out / name).is_file(), name
    runs = {(m, s): json.loads((run_dir(out, m, s) / "metrics.json").read_text()) for m in ("none", "jtt") for s in (0, 1)}
    summary = json.loads((out / "comparison.json").read_text())
    for m in ("none", "jtt"):
        acc = [runs[m, s]["accuracy"] for s in (0, 1)]
        got = summary["methods"][m]["metrics"]["accuracy"]
        assert got["values"] == pytest.approx(acc)
        assert got["mean"] == pytest.approx(np.mean(acc)) and got["std"] == pytest.approx(np.std(acc, ddof=1))
        worst = [runs[m, s]["groupings"]["colour"]["worst_group_accuracy"] for s in (0, 1)]
        assert summary["methods"][m]["metrics"]["worst colour accuracy"]["values"] == pytest.approx(worst)
    delta = summary["deltas_vs_none"]["jtt"]["worst colour x label accuracy"]["values"]
    expected = [runs["jtt", s]["worst_group_accuracy"] - runs["none", s]["worst_group_accuracy"] for s in (0, 1)]
    assert delta == pytest.approx(expected)
    assert "| worst colour x label accuracy |" in res.markdown and "| blue x circle |" in res.markdown

    # run again: every finished run is reused, nothing is retrained
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/classifier.pt")}
    run_compare(job)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/classifier.pt")} == stamp
    # other options on the same folder are refused rather than mixed in
    other = replace(job, base=replace(job.base, width=12))
    with pytest.raises(DebiasError, match="other options"):
        run_compare(other)


def test_compare_reports_the_oracle_reference_and_the_gap_each_method_closes(tmp_path):
    from debias.pipelines.compare import ORACLE_LABEL

    out = tmp_path / "cmp"
    job = CompareJob(base=replace(base_job(out), stage1_epochs=1, rarity_dims=8), out=out,
                     methods=["cluster-errors", "jtt"], seeds=[0, 1], oracle_groups=["colour", "label"], progress=False)
    res = run_compare(job)
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["methods"]) == ["none", "cluster-errors", "jtt", "oracle"]  # ERM added: the gap starts there
    for m in ("cluster-errors", "jtt"):
        got = summary["gap_closed"][m]["values"]
        expected = []
        for s in (0, 1):
            w = {k: json.loads((run_dir(out, k, s) / "metrics.json").read_text())["worst_group_accuracy"]
                 for k in ("none", m, "oracle")}
            if w["oracle"] > w["none"]:
                expected.append((w[m] - w["none"]) / (w["oracle"] - w["none"]))
        assert got == pytest.approx(expected)
    assert ORACLE_LABEL in res.markdown and "share of the ERM→oracle worst-group gap closed" in res.markdown
    assert "oracle" not in summary["gap_closed"]


def test_gap_closed_hand_computed():
    from debias.pipelines.compare import gap_closed

    def run(seed, worst):
        return {"seed": seed, "worst_group_accuracy": worst}

    runs = {"none": [run(0, 0.1), run(1, 0.2)], "m": [run(0, 0.4), run(1, 0.2)], "oracle": [run(0, 0.5), run(1, 0.2)]}
    g = gap_closed(runs)["m"]
    assert g["values"] == pytest.approx([0.75])  # seed 1 has no gap to close and is left out
    assert g["mean"] == pytest.approx(0.75)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the command line in this process (as `debias ARGS`): exit code, stdout, stderr."""
    from debias.pipelines.cli import main

    monkeypatch.setattr(sys, "argv", ["debias", *args])
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_cli_train_classifier_prints_the_group_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        monkeypatch, capsys,
        "train-classifier", "--data", SPURIOUS, "--label", "label", "--where", "split=train", "--eval-where",
        "split=test", "--eval-groups", "colour,label", "--reweight", "none", "--epochs", "1", "--out", str(out),
        "-q", *TINY,
    )
    assert code == 0, stderr
    assert "colour x label" in stdout and "worst" in stdout and "blue x square" in stdout
    assert len(pd.read_csv(out / "predictions.csv")) == 80


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--reweight", "bogus"], "--reweight must be one of"),
        (["--reweight", "two-stage"], "--weights"),
        (["--reweight", "none", "--subsample", "colour=red"], "--subsample"),
        (["--reweight", "none", "--eval-groups", "nosuch"], "nosuch"),
        (["--reweight", "dbvae", "--combine", "sum"], "--combine must be one of product, max"),
        (["--stage1-loss", "mse"], "--stage1-loss must be one of ce, gce"),
    ],
    ids=["unknown-method", "two-stage-without-weights", "bad-subsample", "unknown-group", "bad-combine", "bad-loss"],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    code, _, stderr = cli(monkeypatch, capsys, "train-classifier", "--data", SPURIOUS, "--label", "label", "--where",
                          "split=train", "--eval-where", "split=test", "--out", str(tmp_path / "r"), "-q", *TINY, *args)
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in stderr


def test_cli_dbvae_density_options_reach_the_run(tmp_path, monkeypatch, capsys):
    """The density options of the command line are the ones the DB-VAE run used and stored with its classifier."""
    from debias.training.classifier import load_classifier

    out = tmp_path / "run"
    code, _, stderr = cli(
        monkeypatch, capsys,
        "train-classifier", "--data", SPURIOUS, "--label", "label", "--where", "split=train", "--eval-where",
        "split=test", "--reweight", "dbvae", "--epochs", "1", "--combine", "max", "--bins", "7", "--no-whiten",
        "--dims", "active", "--out", str(out), "-q", *TINY,
    )
    assert code == 0, stderr
    density = load_classifier(out)[1]["meta"]["method_options"]["density"]
    assert (density["combine"], density["bins"], density["whiten"], density["dims"]) == ("max", 7, False, "active")


def test_cli_default_method_is_auto_and_its_options_reach_the_run(tmp_path, monkeypatch, capsys):
    from debias.training.classifier import load_classifier

    out = tmp_path / "run"
    code, stdout, stderr = cli(
        monkeypatch, capsys,
        "train-classifier", "--data", SPURIOUS, "--label", "label", "--where", "split=train", "--eval-where",
        "split=test", "--eval-groups", "colour,label", "--epochs", "1", "--stage1-epochs", "1", "--auto-gate", "0.5",
        "--out", str(out), *TINY,
    )
    assert code == 0, stderr
    meta = load_classifier(out)[1]["meta"]
    assert meta["method"] == "auto"
    assert meta["method_options"]["stage1_epochs"] == 1 and meta["method_options"]["auto_gate"] == 0.5
    assert meta["method_options"]["stage1_loss"] == "gce" and meta["method_options"]["stage1_encoder"] == "local"
    chose = json.loads((out / "metrics.json").read_text())["first_model"]["chose"]
    assert chose in ("lff", "none")
    assert "share of the draws per colour x label" in stdout and (out / "report.html").is_file()


def test_python_m_debias_lists_the_commands():
    """One real subprocess: the commands are registered on the installed entry point."""
    proc = subprocess.run([sys.executable, "-m", "debias", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0 and "train-classifier" in proc.stdout and "compare" in proc.stdout
