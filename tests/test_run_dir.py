"""The run folder every training loop keeps (debias.training.run_dir): refusal, the one resume rule, atomic saves."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from debias.errors import DebiasError
from debias.runtime.checkpoint import load_checkpoint, save_checkpoint
from debias.runtime.distributed import DistContext
from debias.training import run_dir
from debias.training.run_dir import EpochMeter, find_artifact, open_run, run_record

CTX = DistContext()  # one process, CPU


@dataclass
class ModelOptions:
    width: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width}


@dataclass
class Options:
    epochs: int = 3
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    device: str = "cpu"


def record(fingerprint: str = "abc", **changes: Any) -> dict[str, Any]:
    data = {"source": "builtin:shapes", "fingerprint": fingerprint, "n_images": 10}
    return run_record(ModelOptions(), replace(Options(), **changes), data=data, weights="uniform")


def one_epoch_run(out: Path, rec: dict[str, Any] | None = None) -> Path:
    """A run folder after one epoch, written the way the loops write it."""
    run = open_run(out, rec or record(), resume=False, ctx=CTX, seed=0, progress=False)
    run.history.append({"epoch": 1, "loss": 0.5})
    save_checkpoint(run.checkpoint_state(1, {"model": {"w": torch.ones(2)}}), run.checkpoint)
    run.end_epoch("epoch 1")
    return out


def test_a_run_folder_is_refused_without_resume(tmp_path):
    out = one_epoch_run(tmp_path / "run")
    with pytest.raises(DebiasError, match="already holds a training run; pass --resume"):
        open_run(out, record(), resume=False, ctx=CTX, seed=0)


def test_resume_with_the_same_identity_continues(tmp_path, capsys):
    out = one_epoch_run(tmp_path / "run")
    # More epochs, another device and the same images under another name are the same run.
    same = record(epochs=5, device="cuda")
    same["data"] = {**same["data"], "source": "/elsewhere/shapes"}
    run = open_run(out, same, resume=True, ctx=CTX, seed=0, progress=True)
    assert run.start_epoch == 1 and run.history == [{"epoch": 1, "loss": 0.5}]
    assert torch.equal(run.resumed["model"]["w"], torch.ones(2))
    assert f"resuming {out} after epoch 1" in capsys.readouterr().out


def test_resume_of_an_empty_folder_starts_a_new_run(tmp_path, capsys):
    run = open_run(tmp_path / "new", record(), resume=True, ctx=CTX, seed=0, progress=True)
    assert run.start_epoch == 0 and run.resumed is None and run.history == []
    assert "starting a new run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "other, message",
    [
        (record(fingerprint="xyz"), r"it was trained on other data \(abc, now xyz\)"),
        (record(lr=1e-2), r"the training options \(other than --epochs\) differ from the checkpoint's \(lr\)"),
        (record(betas=(0.9, 0.999)), r"training options .*\(betas\)"),
        ({**record(), "model_config": {"width": 16}}, r"the model options differ .*\(width\)"),
        ({**record(), "weights": "0123"}, r"the sampling weights differ"),
        ({**record(), "meta": {"method": "jtt"}}, r"the data or options differ .*\(method\)"),
    ],
)
def test_resume_with_another_identity_is_refused(tmp_path, other, message):
    out = one_epoch_run(tmp_path / "run")
    with pytest.raises(DebiasError, match=message) as err:
        open_run(out, other, resume=True, ctx=CTX, seed=0)
    assert str(err.value).startswith(f"cannot resume {out}: ")


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path):
    """Before one rule, the VAE and classifier stored every training option (epochs and device too)."""
    out = tmp_path / "old"
    out.mkdir()
    rec = record()
    old = {**rec, "train_config": {"epochs": 2, "lr": 1e-3, "betas": [0.5, 0.999], "seed": 0, "device": "cpu"}}
    save_checkpoint({**old, "epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}]}, out / "checkpoint.pt")
    assert open_run(out, rec, resume=True, ctx=CTX, seed=0).start_epoch == 2


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    out = one_epoch_run(tmp_path / "run")
    run = open_run(out, record(), resume=True, ctx=CTX, seed=0)

    def torn_save(obj: Any, f: Any) -> None:  # a crash in the middle of writing the file
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run.checkpoint_state(2, {"model": {"w": torch.zeros(2)}}), run.checkpoint)
    monkeypatch.undo()
    kept = load_checkpoint(out / "checkpoint.pt")
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "loss.csv"]  # no temporary file left behind


def test_checkpoint_history_and_artifact(tmp_path):
    out = one_epoch_run(tmp_path / "run")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["history"] == [{"epoch": 1, "loss": 0.5}] and "version" in ckpt
    assert ckpt["train_config"] == {"lr": 1e-3, "betas": [0.5, 0.999], "seed": 0}  # not epochs nor device
    assert ckpt["data"]["fingerprint"] == "abc" and ckpt["weights"] == "uniform"
    assert pd.read_csv(out / "loss.csv").to_dict("records") == [{"epoch": 1, "loss": 0.5}]

    run = open_run(out, record(), resume=True, ctx=CTX, seed=0, history_name="history.csv", config={"a": 1})
    path = run.finish("model.pt", {"model": {"w": torch.ones(2)}})
    artifact = load_checkpoint(path)
    assert artifact["history"] == ckpt["history"] and artifact["model_config"] == {"width": 8}
    assert (out / "config.json").read_text().strip() == '{\n  "a": 1\n}'
    assert find_artifact(out, "model.pt", "none") == path


def test_find_artifact_tells_an_unfinished_run_from_none(tmp_path):
    out = one_epoch_run(tmp_path / "run")
    with pytest.raises(DebiasError, match="has a checkpoint but no model.pt: training did not finish"):
        find_artifact(out, "model.pt", "no model")
    with pytest.raises(DebiasError, match="no model here"):
        find_artifact(tmp_path / "nothing", "model.pt", "no model here")


def test_epoch_draws_depend_on_seed_and_epoch_only(tmp_path):
    run = open_run(tmp_path / "run", record(), resume=False, ctx=CTX, seed=3)
    a = (run.seed_epoch(1).permutation(10), torch.rand(3))
    run.seed_epoch(0)
    b = (run.seed_epoch(1).permutation(10), torch.rand(3))
    assert (a[0] == b[0]).all() and torch.equal(a[1], b[1])
    assert (run.shard(1, a[0], "t") == a[0]).all()  # one process: the whole epoch


def test_epoch_meter_means_are_row_weighted():
    meter = EpochMeter()
    meter.add({"loss": 1.0}, 3)
    meter.add({"loss": 3.0}, 1)
    assert meter.means(CTX) == ({"loss": 1.5}, 4.0) and meter.seconds >= 0


def test_the_identity_rule_is_the_only_one():
    assert run_dir.identity(record()) == run_dir.identity(record(epochs=9, device="cuda"))
    assert run_dir.identity(record())["data"] == "abc"
