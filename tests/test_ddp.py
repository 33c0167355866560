"""Data-parallel training under torchrun (2 CPU processes, gloo) against single-process runs of the same job.

What "the same semantics" means here (debias/runtime/distributed.py): every rank draws the same global epoch order and trains
on its strided slice, and --batch-size is the global batch, so the ranks' k-th batches together are the single
process's k-th batch. The rows each rank trains on are recorded with DEBIAS_RECORD_ROWS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from debias.data import BUILTIN_DATASETS
from debias.data.splits import validation_split
from debias.errors import DebiasError
from debias.pipelines.train import TrainJob, run_train
from debias.pipelines.train_classifier import ClassifierJob, run_train_classifier
from debias.runtime.checkpoint import load_checkpoint
from debias.runtime.device import set_precision
from debias.runtime.distributed import DistContext, per_rank_batch, shard
from debias.training.classifier import ClassifierTrainConfig, load_classifier
from debias.training.vae import TrainConfig, encode_labels, load_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

SHAPES = "builtin:shapes?n=200"
# fp32 on both sides: the runs are compared number by number, and bf16 rounds a half batch differently from a whole one
# No contrastive encoder in the VAE comparisons (its own test is test_contrastive_encoder_under_torchrun)
VAE_ARGS = [
    "--image-size", "32", "--latent-dim", "4", "--width", "8", "--batch-size", "64", "--device", "cpu",
    "--precision", "fp32", "--contrastive-epochs", "0",
]  # fmt: skip
SPURIOUS_N = 400
CLS_ARGS = [
    "--label", "label", "--where", "split=train", "--eval-where", "split=test", "--image-size", "32",
    "--latent-dim", "4", "--width", "8", "--batch-size", "64", "--select", "last", "--device", "cpu", "--seed", "1",
    "--precision", "fp32",
]  # fmt: skip


def torchrun(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m debias ARGS`` (standalone: a free rendezvous port, so parallel
    runs do not collide on 29500)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "debias"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def in_process(fn, env: dict[str, str]):
    """Run a single-process job here with the environment, the one thread per process and the fp32 forward passes the
    torchrun ranks have (VAE_ARGS, CLS_ARGS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_precision("fp32")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            return fn()
    finally:
        torch.set_num_threads(threads)
        set_precision("auto")


def rows_of(folder: Path, tag: str, epoch: int, world_size: int) -> list[np.ndarray]:
    return [np.load(folder / f"{tag}-epoch{epoch}-rank{r}.npy") for r in range(world_size)]


def interleave(shards: list[np.ndarray]) -> np.ndarray:
    """Undo the strided sharding: position i of the padded global order is shard i % W, entry i // W."""
    out = np.empty(sum(len(s) for s in shards), dtype=np.int64)
    for r, s in enumerate(shards):
        out[r :: len(shards)] = s
    return out


def assert_close_weights(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol}"
    return worst


# ---------------------------------------------------------------------------------------------------- unit level
def test_shard_pads_so_ranks_step_together_and_interleaves_back():
    order = np.random.default_rng(0).permutation(11)
    shards = [shard(order, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {4}  # 11 rows padded to 12
    padded = interleave(shards)
    assert np.array_equal(padded[:11], order) and padded[11] == order[0]


def test_global_batch_must_split_evenly():
    assert per_rank_batch(64, DistContext(rank=0, world_size=2)) == 32
    with pytest.raises(DebiasError, match="multiple of the 3 processes"):
        per_rank_batch(64, DistContext(rank=0, world_size=3))


# ------------------------------------------------------------------------------------------------- debias train
@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """One torchrun run stopped after epoch 1 and resumed under torchrun to epoch 2 (a copy of its epoch-1 state is
    resumed single-process), and the same job uninterrupted in a single process."""
    root = tmp_path_factory.mktemp("ddp-vae")
    env = {"DEBIAS_CACHE_DIR": str(root / "cache")}
    record = {**env, "DEBIAS_RECORD_ROWS": str(root / "rows-ddp")}
    run = root / "ddp" / "run"
    first = torchrun("train", "--data", SHAPES, "--out", str(run), "--epochs", "1", *VAE_ARGS, env=record)
    shutil.copytree(run, root / "single-resume" / "run")
    resumed = torchrun("train", "--data", SHAPES, "--out", str(run), "--epochs", "2", "--resume", *VAE_ARGS, env=record)
    job = TrainJob(
        data=SHAPES, out=root / "single" / "run", image_size=32, latent_dim=4, width=8,
        train=TrainConfig(epochs=2, batch_size=64, device="cpu"), contrastive_epochs=0, progress=False,
    )  # fmt: skip
    in_process(lambda: run_train(job), {**env, "DEBIAS_RECORD_ROWS": str(root / "rows-single")})
    return {"root": root, "env": env, "first": first, "resumed": resumed}


def test_contrastive_encoder_under_torchrun(tmp_path):
    """`debias train` trains the novelty score's contrastive encoder data-parallel after the VAE: rank 0 alone writes
    it, it loads in a single process, and the detector reads its features."""
    from debias.density.detector import open_detector
    from debias.training.contrastive import encoder_path, load_encoder

    run = tmp_path / "run"
    args = [a for a in VAE_ARGS if a not in ("--contrastive-epochs", "0")]
    proc = torchrun("train", "--data", SHAPES, "--out", str(run), "--epochs", "1", "--contrastive-epochs", "2",
                    "--contrastive-min-steps", "0", *args,
                    env={"DEBIAS_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.stdout.count("model written to") == 1
    encoder, meta = load_encoder(encoder_path(run))
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    assert meta["data"]["n_images"] - meta["data"]["n_calibration"] == 160  # the VAE's rows: 80 % of 200
    assert open_detector(run, progress=False).scorer.statistics[-1] == "embedding_knn"


def test_train_under_torchrun_writes_a_model_that_loads_single_process(vae_runs):
    run = vae_runs["root"] / "ddp" / "run"
    for name in ("model.pt", "checkpoint.pt", "config.json", "loss.csv", "loss.png"):
        assert (run / name).is_file(), name
    assert vae_runs["first"].stdout.count("model written to") == 1  # rank 0 alone reports
    model, meta = load_model(run)  # a plain ConvVAE: no "module." prefixes, no process group needed
    assert all(np.isfinite(h["loss"]) for h in meta["history"])
    with torch.no_grad():
        out = model(torch.rand(3, 3, 32, 32))
    assert out["recon_logits"].shape == (3, 3, 32, 32)


def test_ranks_together_see_the_single_process_epoch(vae_runs):
    root = vae_runs["root"]
    for epoch in (0, 1):  # epoch 1 comes from the resumed run: resuming keeps the uninterrupted order
        single = rows_of(root / "rows-single", "vae", epoch, 1)[0]
        shards = rows_of(root / "rows-ddp", "vae", epoch, 2)
        assert len(shards[0]) == len(shards[1]) == len(single) // 2  # 160 rows: no padding needed
        assert not set(shards[0]) & set(shards[1])
        assert np.array_equal(interleave(shards), single)
        # a permutation of the 160 training rows (40 of the 200 are held out for the novelty calibration)
        assert sorted(single.tolist()) == list(range(160))


def test_resume_under_torchrun_and_single_process(vae_runs):
    root = vae_runs["root"]
    assert vae_runs["resumed"].stdout.count("resuming") == 1
    _, meta = load_model(root / "ddp" / "run")
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    # The epoch-1 history row survives the resume unchanged (rank 0 wrote it into the checkpoint).
    first_only = load_checkpoint(root / "single-resume" / "run" / "checkpoint.pt")["history"]
    assert meta["history"][0] == first_only[0]

    # A torchrun checkpoint resumes single-process too (it holds the plain module's weights).
    job = TrainJob(
        data=SHAPES, out=root / "single-resume" / "run", image_size=32, latent_dim=4, width=8,
        train=TrainConfig(epochs=2, batch_size=64, device="cpu"), contrastive_epochs=0, resume=True, progress=False,
    )  # fmt: skip
    in_process(lambda: run_train(job), vae_runs["env"])
    _, meta = load_model(root / "single-resume" / "run")
    assert [h["epoch"] for h in meta["history"]] == [1, 2]


# -------------------------------------------------------------------------------------- debias train-classifier
def spurious_weights(path: Path) -> np.ndarray:
    """Stand-in audit weights for every row: zero for every 5th row, 4 on red shapes, 1 elsewhere."""
    table = BUILTIN_DATASETS["spurious"].table(n=SPURIOUS_N)
    w = np.where(table["colour"] == "red", 4.0, 1.0)
    w[np.arange(len(table)) % 5 == 0] = 0.0
    table.assign(weight=w).to_parquet(path)
    return w


def classifier_job(out: Path, method: str, epochs: int, **kw) -> ClassifierJob:
    return ClassifierJob(
        data=f"builtin:spurious?n={SPURIOUS_N}", label="label", out=out, method=method, where=["split=train"],
        eval_where=["split=test"], image_size=32, latent_dim=4, width=8,
        train=ClassifierTrainConfig(epochs=epochs, batch_size=64, seed=1, device="cpu", select="last"),
        progress=False, show_table=False, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_stage_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-cls")
    env = {"DEBIAS_CACHE_DIR": str(root / "cache")}
    weights = spurious_weights(root / "scores.parquet")
    torchrun(
        "train-classifier", "--data", f"builtin:spurious?n={SPURIOUS_N}", "--out", str(root / "ddp" / "run"),
        "--reweight", "two-stage", "--weights", str(root / "scores.parquet"), "--epochs", "2", "-q", *CLS_ARGS,
        env={**env, "DEBIAS_RECORD_ROWS": str(root / "rows-ddp")},
    )  # fmt: skip
    job = classifier_job(root / "single" / "run", "two-stage", 2, weights=root / "scores.parquet")
    in_process(lambda: run_train_classifier(job), {**env, "DEBIAS_RECORD_ROWS": str(root / "rows-single")})
    return {"root": root, "weights": weights}


def test_weighted_epochs_are_the_single_process_draws_and_honour_the_weights(two_stage_runs):
    root = two_stage_runs["root"]
    table = BUILTIN_DATASETS["spurious"].table(n=SPURIOUS_N)
    train_rows = np.flatnonzero(table["split"] == "train")
    _, meta = load_classifier(root / "ddp" / "run")
    n = meta["meta"]["n_train"]
    counts = np.zeros(n)
    for epoch in (0, 1):
        single = rows_of(root / "rows-single", "run", epoch, 1)[0]
        shards = rows_of(root / "rows-ddp", "run", epoch, 2)
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)
        assert np.array_equal(interleave(shards)[:n], single)  # the same n draws; padding only past the end
        counts += np.bincount(np.concatenate(shards), minlength=n)
    # Positions index the fit rows (training rows minus the validation split); map them back to the table.
    y, _ = encode_labels(table["label"].iloc[train_rows])
    fit_pos, _ = validation_split(y, 0.1, 1)
    w = two_stage_runs["weights"][train_rows[fit_pos]]
    assert counts[w == 0].sum() == 0  # zero weight: never drawn on any rank
    heavy, light = counts[w == 4].mean(), counts[w == 1].mean()
    assert heavy > 2.5 * light, (heavy, light)  # drawn ∝ weight: about 4x


def test_two_processes_match_one_process_with_the_same_global_batch(two_stage_runs):
    root = two_stage_runs["root"]
    ddp, _ = load_classifier(root / "ddp" / "run")
    single, _ = load_classifier(root / "single" / "run")
    # Cross-entropy has no noise, and DDP averages the two half-batch gradients into the full batch's: the runs
    # differ only by float summation order (measured ~2e-8 on weights of size ~0.5 after 10 steps of Adam).
    assert_close_weights(ddp.state_dict(), single.state_dict(), atol=1e-5)
    assert (root / "ddp" / "run" / "metrics.json").is_file()


def test_dbvae_weights_from_rank_0_give_every_rank_the_same_draw(tmp_path):
    """DB-VAE recomputes the weights from the model each epoch (rank 0, broadcast). In epoch 0 the model is the
    seeded initial one, so the draw must equal the single-process draw exactly."""
    env = {"DEBIAS_CACHE_DIR": str(tmp_path / "cache")}
    torchrun(
        "train-classifier", "--data", f"builtin:spurious?n={SPURIOUS_N}", "--out", str(tmp_path / "ddp" / "run"),
        "--reweight", "dbvae", "--epochs", "1", "-q", *CLS_ARGS,
        env={**env, "DEBIAS_RECORD_ROWS": str(tmp_path / "rows-ddp")},
    )  # fmt: skip
    job = classifier_job(tmp_path / "single" / "run", "dbvae", 1)
    in_process(lambda: run_train_classifier(job), {**env, "DEBIAS_RECORD_ROWS": str(tmp_path / "rows-single")})
    single = rows_of(tmp_path / "rows-single", "run", 0, 1)[0]
    shards = rows_of(tmp_path / "rows-ddp", "run", 0, 2)
    assert np.array_equal(interleave(shards)[: len(single)], single)
    assert len(np.unique(single)) < len(single)  # weighted draws (heavy rows twice or more), not a permutation
    _, meta = load_classifier(tmp_path / "ddp" / "run")
    assert meta["history"][0]["ess_fraction"] < 1.0


def test_default_method_runs_under_torchrun(tmp_path):
    """auto: the first model trains data-parallel, rank 0 weighs the rows (LfF's weights every epoch; the gate at 1
    takes that branch whatever one epoch of the first model learned) and broadcasts them, and every rank draws its
    slice of the same weighted epochs."""
    env = {"DEBIAS_CACHE_DIR": str(tmp_path / "cache"), "DEBIAS_RECORD_ROWS": str(tmp_path / "rows")}
    torchrun(
        "train-classifier", "--data", f"builtin:spurious?n={SPURIOUS_N}", "--out", str(tmp_path / "ddp" / "run"),
        "--epochs", "1", "--stage1-epochs", "1", "--auto-gate", "1", "-q", *CLS_ARGS, env=env,
    )  # fmt: skip
    _, meta = load_classifier(tmp_path / "ddp" / "run")
    assert meta["meta"]["method"] == "auto" and meta["history"][0]["ess_fraction"] < 1.0
    shards = rows_of(tmp_path / "rows", "run", 0, 2)
    assert len(shards[0]) == len(shards[1]) == -(-meta["meta"]["n_train"] // 2)


def test_augment_under_torchrun_writes_its_images_once(tmp_path):
    """Every rank trains the GAN, rank 0 alone generates; --n-images because torchrun's parser takes a bare --n for an
    ambiguous abbreviation of its own options."""
    out = tmp_path / "aug"
    proc = torchrun("augment", "--method", "gan", "--data", SHAPES, "--label", "shape", "--n-images", "8",
                    "--image-size", "28", "--epochs", "1", "--width", "8", "--batch-size", "32", "--device", "cpu",
                    "--out", str(out), "-q", env={})
    assert proc.stdout.count("wrote 8 gan images") == 1
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 8 and sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(p).name for p in manifest["path"]
    )
