"""The command line: one-line errors with exit code 2, `python -m debias`, and the train -> audit path end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from debias.runtime.checkpoint import load_checkpoint

TINY = "builtin:shapes?n=240"
TRAIN_ARGS = ["--image-size", "32", "--latent-dim", "6", "--width", "8", "--batch-size", "64", "-q"]


def debias(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "debias", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]


def test_help_lists_commands():
    proc = debias("--help")
    assert proc.returncode == 0
    for cmd in ("train", "audit", "demo"):
        assert cmd in proc.stdout


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: str(d / "nope"), "no such file or folder"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no images found"),
        (lambda d: (d / "m.csv").write_text("file,x\na.png,1\n") and str(d / "m.csv"), "no 'path' column"),
    ],
    ids=["missing", "empty-folder", "manifest-without-path"],
)
def test_bad_sources_give_one_line_errors(tmp_path, setup, fragment):
    source = setup(tmp_path)
    proc = debias("train", "--data", source, "--out", str(tmp_path / "run"), *TRAIN_ARGS)
    assert_one_line_error(proc, fragment)


def test_unknown_where_column(tmp_path):
    proc = debias("train", "--data", TINY, "--where", "colour=red", "--where", "nosuch=1", "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "nosuch")


def test_audit_without_model(tmp_path):
    proc = debias("audit", "--model", str(tmp_path / "none"), "--data", TINY, "--out", str(tmp_path / "a"))
    assert_one_line_error(proc, "no trained model")


@pytest.mark.parametrize("option, value", [("--combine", "sum"), ("--dims", "some")])
def test_audit_refuses_unknown_density_options(tmp_path, option, value):
    proc = debias("audit", "--model", str(tmp_path / "none"), "--data", TINY, "--out", str(tmp_path / "a"), option, value)
    assert_one_line_error(proc, f"{option} must be")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "model"
    proc = debias("train", "--data", TINY, "--out", str(run), "--epochs", "2", *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    return run


def test_train_writes_run_dir(trained_run):
    for name in ("model.pt", "checkpoint.pt", "config.json", "loss.csv", "loss.png"):
        assert (trained_run / name).is_file(), name
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "model_config", "data", "history"} <= set(ckpt)
    assert len(ckpt["data"]["fingerprint"]) == 16
    loss = pd.read_csv(trained_run / "loss.csv")
    assert list(loss["epoch"]) == [1, 2] and (loss["loss"] > 0).all()


def test_train_refuses_to_overwrite_a_run(trained_run):
    proc = debias("train", "--data", TINY, "--out", str(trained_run), *TRAIN_ARGS)
    assert_one_line_error(proc, "--resume")


def test_resume_refuses_other_data(trained_run):
    proc = debias("train", "--data", "builtin:shapes?n=250", "--out", str(trained_run), "--resume", *TRAIN_ARGS)
    assert_one_line_error(proc, "other data")


def test_audit_end_to_end(trained_run, tmp_path):
    out = tmp_path / "audit"
    proc = debias("audit", "--model", str(trained_run), "--data", TINY, "--out", str(out), "--group-by", "group,shape", "-q")
    assert proc.returncode == 0, proc.stderr
    scores = pd.read_parquet(out / "scores.parquet")
    csv = pd.read_csv(out / "scores.csv")
    assert len(scores) == len(csv) == 240
    for col in ("path", "shape", "colour", "group", "rare", "split", "rarity", "weight", "recon_error"):
        assert col in scores.columns, col
    assert scores["weight"].sum() == pytest.approx(1.0)
    assert (scores["recon_error"] >= 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 240 and summary["n_skipped"] == 0
    assert 1 <= summary["effective_sample_size"] <= 240
    assert set(summary["groups"]) == {"group", "shape", "group x shape"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 6 and "white triangle" in html
    assert html.find("<h2>What the audit found</h2>") < html.find("<h2>Run details</h2>")
    # the terminal table (issue 15): one per grouping, groups sorted by weight ratio, with its figures
    assert summary["rarity_estimator"] == "knn-recon" and {"rarity_latent", "rarity_reconstruction"} <= set(scores)
    assert "Groups by shape" in proc.stdout and "% weight" in proc.stdout and "ratio = share of weight" in proc.stdout
    shapes = summary["groups"]["shape"]
    lines = [line for line in proc.stdout.splitlines() if any(f"│ {g} " in line for g in shapes)]
    printed = [next(g for g in shapes if f"│ {g} " in line) for line in lines]
    assert printed == sorted(shapes, key=lambda g: -shapes[g]["weight_ratio"])
    for g in shapes:
        row = next(line for line in lines if f"│ {g} " in line)
        assert f"{shapes[g]['weight_ratio']:.2f}" in row and f"{shapes[g]['share']:.1%}" in row


def test_audit_max_rule_and_where(trained_run, tmp_path):
    out = tmp_path / "audit"
    proc = debias(
        "audit", "--model", str(trained_run), "--data", TINY, "--where", "split=train", "--out", str(out),
        "--combine", "max", "--no-report", "-q",
    )
    assert proc.returncode == 0, proc.stderr
    scores = pd.read_parquet(out / "scores.parquet")
    assert set(scores["split"]) == {"train"} and not (out / "report.html").exists()
    assert json.loads((out / "summary.json").read_text())["density"]["combine"] == "max"


def test_python_m_and_console_script_agree():
    exe = Path(sys.executable).with_name("debias")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout == debias("--help").stdout


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """Kill a training run after its first checkpoint, resume it, and get the weights of an uninterrupted run."""
    args = ["--data", TINY, *TRAIN_ARGS, "--seed", "3", "--device", "cpu"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "debias", "train", "--out", str(killed), "--epochs", "200", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(killed / "checkpoint.pt")["epoch"]  # the file is whole even though we killed mid-write
    assert 1 <= done < 200
    target = str(done + 1)
    resumed = debias("train", "--out", str(killed), "--epochs", target, "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    fresh = debias("train", "--out", str(tmp_path / "fresh"), "--epochs", target, *args)
    assert fresh.returncode == 0, fresh.stderr
    a = load_checkpoint(killed / "model.pt")
    b = load_checkpoint(tmp_path / "fresh" / "model.pt")
    assert len(a["history"]) == int(target)
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert not list(killed.glob(".*.tmp"))  # no temporary files left next to the checkpoint


def test_checkpoint_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected with a one-line error."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "model.pt"
    torch.save({"x": Evil()}, path)
    proc = debias("audit", "--model", str(path), "--data", TINY, "--out", str(tmp_path / "a"))
    assert_one_line_error(proc, "cannot load checkpoint")
    assert "pwned" not in proc.stdout


def test_train_with_a_label_leaves_out_rows_without_one(tmp_path):
    """Rows whose label is missing are reported and skipped, like unreadable images, and counted in config.json."""
    import numpy as np
    from PIL import Image

    rows = []
    for i in range(24):
        Image.fromarray(np.full((16, 16, 3), 10 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "lab": None if i % 6 == 0 else ("a" if i % 2 else "b")})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    run = tmp_path / "run"
    proc = debias("train", "--data", str(tmp_path / "m.csv"), "--label", "lab", "--epochs", "1", "--out", str(run),
                  *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "4 rows without a 'lab' value left out" in proc.stderr and "Traceback" not in proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["n_unlabelled"] == 4 and config["data"]["n_images"] == 20
    assert config["model"]["classes"] == ["a", "b"]


@pytest.mark.parametrize("change, fragment", [
    ({"latent_dim": 9}, "weights do not fit"),
    ({"width": 10**6}, "model_config.width"),
    ({"image_size": "big"}, "bad model_config"),
], ids=["wrong-shapes", "oversized-width", "wrong-type"])
@pytest.mark.parametrize("command", ["audit", "score"])
def test_a_model_that_does_not_match_its_config_is_a_one_line_error(tmp_path, change, fragment, command):
    from debias.models import ConvVAE, VAEConfig

    cfg = VAEConfig(image_size=32, latent_dim=4, width=8)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": ConvVAE(cfg).state_dict(), "model_config": {**cfg.to_dict(), **change}}, run / "model.pt")
    proc = debias(command, "--model", str(run), "--data", TINY, "--out", str(tmp_path / "out"), "-q")
    assert_one_line_error(proc, fragment)


def test_precision_option(tmp_path):
    """Issue 17: --precision auto|fp32|bf16. auto picks bf16 only where the hardware has it; an unknown value, or bf16
    on a CPU without AMX or AVX-512-BF16, is a one-line error; the run records what it used. Where the CPU has bf16,
    a bf16 run trains and its loss stays within 5 % of fp32's."""
    import torch

    from debias.errors import DebiasError
    from debias.runtime.device import cpu_has_bf16, effective_precision, set_precision

    has_bf16 = cpu_has_bf16() or torch.cuda.is_available()
    try:
        set_precision("auto")
        assert effective_precision(torch.device("cpu")) == ("bf16" if cpu_has_bf16() else "fp32")
        set_precision("fp32")
        assert effective_precision(torch.device("cpu")) == "fp32"
        with pytest.raises(DebiasError, match="must be one of auto, fp32, bf16"):
            set_precision("half")
        if not has_bf16:
            with pytest.raises(DebiasError, match="neither AMX nor AVX-512-BF16"):
                set_precision("bf16")
    finally:
        set_precision("auto")
    runs = {}
    for precision in ("fp32", "bf16") if has_bf16 else ("fp32",):
        proc = debias("train", "--data", TINY, "--out", str(tmp_path / precision), "--epochs", "1",
                      "--precision", precision, *TRAIN_ARGS)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / precision / "config.json").read_text())["train"]["precision"] == precision
        runs[precision] = pd.read_csv(tmp_path / precision / "loss.csv")["loss"].iloc[-1]
    if "bf16" in runs:
        assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.05)
