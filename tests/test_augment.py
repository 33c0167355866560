"""`debias augment`: GAN and CycleGAN few-step runs on built-in data, outputs, manifests, resume, weighted sampling."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import debias.training.cyclegan as cyclegan_training
import debias.training.gan as gan_training
from debias.data import load_images
from debias.errors import DebiasError
from debias.pipelines.augment import (
    AugmentJob,
    CycleGANOptions,
    GANOptions,
    label_mix,
    run_augment,
)
from debias.runtime.checkpoint import load_checkpoint
from debias.training.gan import epoch_rows

SHAPES = "builtin:shapes?n=200&rare=0.1"
SPURIOUS = "builtin:spurious?n=200"
SIZE = 32


def gan_job(out: Path, **kw) -> AugmentJob:
    base = AugmentJob(
        method="gan", data=SHAPES, out=out, n=12, image_size=SIZE, epochs=2, batch_size=32,
        gan=GANOptions(z_dim=16, width=8), progress=False,
    )
    return replace(base, **kw)


def cyclegan_job(out: Path, **kw) -> AugmentJob:
    base = AugmentJob(
        method="cyclegan", data=SPURIOUS, out=out, n=6, image_size=SIZE, epochs=2, batch_size=16, label="label",
        cyclegan=CycleGANOptions(domain_column="colour", source="red", target="blue", width=4, n_blocks=1),
        progress=False,
    )
    return replace(base, **kw)


def tiny_vae_run(run: Path) -> Path:
    """A one-epoch VAE on SHAPES: enough for rarity weights and quality features."""
    from debias.models import VAEConfig
    from debias.training.vae import DataDescription, TrainConfig, train_vae

    data = load_images(SHAPES, image_size=SIZE, progress=False)
    desc = DataDescription(source=SHAPES, where=[], fingerprint=data.fingerprint, n_images=len(data), n_skipped=0)
    train_vae(data, VAEConfig(image_size=SIZE, latent_dim=4, width=8), TrainConfig(epochs=1, batch_size=64), run,
              data_desc=desc, progress=False)
    return run


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- GAN
def test_gan_run_writes_images_manifest_and_checkpoint(tmp_path):
    out = tmp_path / "gan"
    result = run_augment(gan_job(out, label="shape"))
    manifest = pd.read_csv(result.manifest)
    assert list(manifest.columns) == ["path", "shape", "synthetic", "method"]
    assert len(manifest) == 12 and manifest["synthetic"].all() and (manifest["method"] == "gan").all()
    assert set(manifest["shape"]) <= {"circle", "square", "triangle"}
    for rel in manifest["path"]:
        with Image.open(out / rel) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    for key in ("generator", "discriminator", "ema", "opt_g", "opt_d", "epoch", "model_config", "train_config"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["model_config"]["classes"] == ["circle", "square", "triangle"]
    assert len(pd.read_csv(out / "loss.csv")) == 2

    # Round trip: the manifest is a data source, with its columns.
    back = load_images(str(result.manifest), image_size=SIZE, progress=False)
    assert len(back) == 12 and back.channels == 3 and len(back.skipped) == 0
    assert back.table["shape"].tolist() == manifest["shape"].tolist()
    assert back.images.std() > 0  # not blank images


def test_gan_greyscale_28px_unconditional(tmp_path):
    out = tmp_path / "grey"
    result = run_augment(gan_job(out, data="builtin:shapes?n=64", image_size=28, epochs=1, n=3))
    manifest = pd.read_csv(result.manifest)
    assert list(manifest.columns) == ["path", "synthetic", "method"]
    with Image.open(out / manifest["path"][0]) as im:
        assert im.size == (28, 28)


def test_conditional_generator_keeps_using_z(tmp_path):
    """Regression: a generator fed [z; label embedding] learnt to ignore z and drew one image per class (the per-pixel
    spread across z at a fixed label fell to ~0.03 here, and to 0.025 on UTKFace against 0.39 for real faces).
    With conditional batch norm, z stays the source of variety within a class (~0.08 after the same 300 steps)."""
    from debias.models.dcgan import DCGANConfig, Generator

    out = tmp_path / "cond"
    run_augment(AugmentJob(
        method="gan", data="builtin:shapes?n=640", out=out, n=4, image_size=28, epochs=30, batch_size=64,
        label="shape", gan=GANOptions(z_dim=32, width=16, ema_decay=0.0), progress=False,
    ))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    generator = Generator(DCGANConfig(**ckpt["model_config"]))
    generator.load_state_dict(ckpt["generator"])
    generator.eval()
    for label in range(3):
        images = generator.sample(64, torch.full((64,), label), generator=torch.Generator().manual_seed(0))
        assert images.std(0).mean().item() > 0.05, label


def test_discriminator_learning_rate_is_its_own(tmp_path):
    """--d-lr (TTUR): the discriminator's optimizer runs at its own rate, the generator's at --lr."""
    out = tmp_path / "ttur"
    run_augment(gan_job(out, epochs=1, lr=1e-4, gan=GANOptions(z_dim=16, width=8, d_lr=4e-4)))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["opt_d"]["param_groups"][0]["lr"] == 4e-4
    assert ckpt["opt_g"]["param_groups"][0]["lr"] == 1e-4


def test_weighted_epochs_draw_rare_rows_more_often():
    rare = np.zeros(1000, dtype=bool)
    rare[:20] = True
    w = np.where(rare, 25.0, 1.0)
    w /= w.sum()  # the rare 2 % get 1/3 of the weight
    drawn = np.concatenate([epoch_rows(w, len(w), seed=0, epoch=e) for e in range(5)])
    share = rare[drawn].mean()
    assert abs(share - w[rare].sum()) < 0.03
    assert share > 10 * rare.mean()
    assert np.array_equal(np.sort(epoch_rows(None, 50, 0, 0)), np.arange(50))  # no weights: a permutation


def test_gan_loop_trains_on_the_weighted_draws(tmp_path, monkeypatch):
    """The rows the training loop actually reads follow the audit weights (here: the rare group weighted 20x)."""
    table = load_images(SHAPES, image_size=SIZE, progress=False).table
    scores = table[["path"]].copy()
    scores["weight"] = np.where(table["rare"] == 1, 20.0, 1.0)
    scores["rarity"] = table["rare"].astype(float)
    scores.to_parquet(tmp_path / "scores.parquet")
    monkeypatch.setenv("DEBIAS_RECORD_ROWS", str(tmp_path / "rows"))  # the loop saves the rows it trains on
    run_augment(gan_job(tmp_path / "w", weights=tmp_path / "scores.parquet", epochs=2))
    rows = np.concatenate([np.load(tmp_path / "rows" / f"gan-epoch{e}-rank0.npy") for e in (0, 1)])
    rare = (table["rare"] == 1).to_numpy()
    expected = 20 * rare.sum() / (20 * rare.sum() + (~rare).sum())  # 20 rare rows: 20*20 / (400 + 180) = 0.69
    assert abs(rare[rows].mean() - expected) < 0.08
    assert rare[rows].mean() > 4 * rare.mean()


def test_label_mix_follows_weights_or_is_balanced():
    labels = np.array([0, 0, 0, 1])
    w = np.array([0.1, 0.1, 0.1, 0.7])
    assert np.allclose(label_mix(labels, 2, w, balanced=False), [0.3, 0.7])
    assert np.allclose(label_mix(labels, 2, None, balanced=False), [0.75, 0.25])
    assert np.allclose(label_mix(labels, 2, w, balanced=True), [0.5, 0.5])


class _Interrupt(Exception):
    pass


def _crash_after_first_checkpoint(monkeypatch, module) -> None:
    real_save = module.save_checkpoint
    calls = {"n": 0}

    def save_then_crash(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise _Interrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_crash)


def test_gan_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    full = tmp_path / "full"
    run_augment(gan_job(full, label="shape"))
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _crash_after_first_checkpoint(m, gan_training)
        with pytest.raises(_Interrupt):
            run_augment(gan_job(cut, label="shape"))
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 1
    with pytest.raises(DebiasError, match="--resume"):
        run_augment(gan_job(cut, label="shape"))
    run_augment(gan_job(cut, label="shape", resume=True))
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    for key in ("generator", "discriminator", "ema"):
        assert state_dicts_equal(a[key], b[key]), key
    assert a["history"][1]["d_loss"] == b["history"][1]["d_loss"]
    # The generated images are the same too.
    for rel in pd.read_csv(full / "manifest.csv")["path"]:
        assert np.array_equal(np.asarray(Image.open(full / rel)), np.asarray(Image.open(cut / rel)))
    with pytest.raises(DebiasError, match="training options"):
        run_augment(gan_job(cut, label="shape", resume=True, lr=1e-3))


# -------------------------------------------------------------------------------------------- CycleGAN
def test_cyclegan_run_translates_domain_a(tmp_path):
    out = tmp_path / "cg"
    result = run_augment(cyclegan_job(out))
    manifest = pd.read_csv(result.manifest)
    assert list(manifest.columns) == ["path", "label", "colour", "synthetic", "method", "source_path"]
    assert len(manifest) == 6 and (manifest["colour"] == "blue").all() and (manifest["method"] == "cyclegan").all()
    source = load_images(SPURIOUS, image_size=SIZE, progress=False).table.set_index("path")
    assert (source.loc[manifest["source_path"], "colour"] == "red").all()  # every source image is from domain A
    assert source.loc[manifest["source_path"], "label"].tolist() == manifest["label"].tolist()  # label carried over
    assert manifest["source_path"].is_unique
    for rel in manifest["path"]:
        with Image.open(out / rel) as im:
            assert im.size == (SIZE, SIZE)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    for key in ("g_ab", "g_ba", "d_a", "d_b", "opt_g", "opt_d", "pool_a", "pool_b", "epoch"):
        assert key in ckpt, key
    assert 0 < len(ckpt["pool_a"]["images"]) <= 50
    history = pd.read_csv(out / "loss.csv")
    assert history["lr"].tolist() == [2e-4, 1e-4]  # constant for the first half, then linear decay
    back = load_images(str(result.manifest), image_size=SIZE, progress=False)
    assert len(back) == 6 and back.table["colour"].eq("blue").all()


def test_cyclegan_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    small = "builtin:spurious?n=80"
    full = tmp_path / "full"
    run_augment(cyclegan_job(full, data=small, epochs=3))
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _crash_after_first_checkpoint(m, cyclegan_training)
        with pytest.raises(_Interrupt):
            run_augment(cyclegan_job(cut, data=small, epochs=3))
    run_augment(cyclegan_job(cut, data=small, epochs=3, resume=True))
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    for key in ("g_ab", "g_ba", "d_a", "d_b"):
        assert state_dicts_equal(a[key], b[key]), key
    assert torch.equal(a["pool_b"]["images"], b["pool_b"]["images"])
    assert [r["lr"] for r in a["history"]] == [r["lr"] for r in b["history"]] == [2e-4, 2e-4, 1e-4]


@pytest.mark.parametrize("make_job, per_epoch", [(gan_job, 7), (cyclegan_job, None)])
def test_a_step_budget_ends_the_run_saved_and_resumable(tmp_path, capsys, make_job, per_epoch):
    """Issue 17: --max-steps ends training after that many steps, mid-epoch: the epoch is recorded as far as it went
    (with the reason), the run is saved and its outputs written; --resume with more epochs continues."""
    out = tmp_path / "run"
    result = run_augment(replace(make_job(out, epochs=3, max_steps=2), progress=True))
    history = pd.read_csv(out / "loss.csv")
    assert len(history) == 1 and history["stopped_by"].iloc[0] == "--max-steps 2"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and result.n_images > 0
    printed = capsys.readouterr()
    assert "stopped by --max-steps 2 after 2 steps" in printed.out
    run_augment(replace(make_job(out, epochs=2), resume=True))
    history = pd.read_csv(out / "loss.csv")
    assert len(history) == 2 and pd.isna(history["stopped_by"].iloc[1])


def test_training_clock_prints_a_whole_run_eta_and_keeps_the_budget(capsys):
    from debias.runtime.progress import TrainingClock

    clock = TrainingClock("GAN", steps_per_epoch=100, epochs_left=20, max_minutes=0.5, eta_after_steps=2,
                          eta_after_s=0.0)
    clock.start -= 4.0  # as if the first two steps took 2 s each
    clock.tick()
    assert clock.eta_line is None
    clock.tick()
    line = capsys.readouterr().err
    assert "per step after 2 steps" in line and "an epoch of 100 steps takes about" in line
    assert "20 epoch(s) left about" in line and "budget stops it after about 15 steps" in line
    assert not clock.exhausted
    clock.start -= 30.0
    assert clock.exhausted and clock.stop_reason == "--max-minutes 0.5"
    with pytest.raises(ValueError, match="max_steps"):
        TrainingClock("GAN", 1, 1, max_steps=0)


def test_cyclegan_blocks_follow_the_image_size():
    from debias.models.cyclegan import default_n_blocks

    assert [default_n_blocks(s) for s in (28, 32, 64, 96, 128)] == [2, 2, 3, 3, 6]


def test_cyclegan_common_to_rare_from_audit_scores(tmp_path):
    table = load_images(SHAPES, image_size=SIZE, progress=False).table
    rng = np.random.default_rng(0)
    scores = table[["path"]].copy()
    scores["rarity"] = table["rare"] * 10.0 + rng.normal(size=len(table))  # the planted rare group is the rarest
    scores["weight"] = np.exp(scores["rarity"]) / np.exp(scores["rarity"]).sum()
    scores.to_csv(tmp_path / "scores.csv", index=False)
    job = cyclegan_job(
        tmp_path / "cg", data=SHAPES, label=None, weights=tmp_path / "scores.csv", epochs=1,
        cyclegan=CycleGANOptions(source="common", target="rare", rare_quantile=0.1, width=4, n_blocks=1),
    )
    manifest = pd.read_csv(run_augment(job).manifest)
    assert (manifest["domain"] == "rare").all()
    threshold = np.quantile(scores["rarity"], 0.9)
    src_rarity = scores.set_index("path").loc[manifest["source_path"], "rarity"]
    assert (src_rarity < threshold).all()  # translated from the common rows


def test_rarity_from_a_vae_run(tmp_path):
    """--model RUN_DIR: the weights are computed by encoding the rows with the VAE (as an audit would)."""
    from debias.pipelines.augment import rarity_columns

    run = tiny_vae_run(tmp_path / "vae")
    # The GAN reads the data at another size than the VAE: the rows are matched on path.
    gan_data = load_images(SHAPES, image_size=28, progress=False)
    cols = rarity_columns(gan_job(tmp_path / "x", model=run, image_size=28), gan_data)
    assert len(cols) == len(gan_data) and np.isclose(cols["weight"].sum(), 1.0)
    assert cols["weight"].nunique() > 1 and np.isfinite(cols["rarity"]).all()


def test_features_measure_the_quality_of_the_output(tmp_path):
    """--features RUN_DIR: after generating, FID/KID, precision/recall and CAS land in OUT/quality/."""
    import json

    run = tiny_vae_run(tmp_path / "vae")
    result = run_augment(gan_job(tmp_path / "gan", label="shape", features=run, n=24))
    assert result.quality is not None and result.quality.is_file()
    quality = json.loads(result.quality.read_text())
    assert (tmp_path / "gan" / "quality" / "quality.html").is_file()
    text = json.dumps(quality)
    for key in ("fid", "kid", "precision", "recall"):
        assert key in text, key


# ---------------------------------------------------------------------------------------- manifests, errors
def test_merge_with_original_manifest(tmp_path):
    # An original manifest on disk: a few built-in images written as PNG files with relative paths.
    data = load_images("builtin:shapes?n=10", image_size=SIZE, progress=False)
    orig_dir = tmp_path / "orig"
    (orig_dir / "img").mkdir(parents=True)
    for i, img in enumerate(data.images):
        Image.fromarray(np.asarray(img)).save(orig_dir / "img" / f"{i}.png")
    original = pd.DataFrame(
        {"path": [f"img/{i}.png" for i in range(10)], "shape": data.table["shape"], "split": data.table["split"]}
    )
    original.to_csv(orig_dir / "manifest.csv", index=False)

    job = gan_job(tmp_path / "gan", label="shape", epochs=1, where=["split=train"], merge_with=orig_dir / "manifest.csv")
    result = run_augment(job)
    combined = load_images(str(result.combined), image_size=SIZE, progress=False)
    assert len(combined) == 10 + 12 and len(combined.skipped) == 0
    assert combined.table["synthetic"].tolist() == [False] * 10 + [True] * 12
    assert all(os.path.isabs(p) for p in combined.table["path"])
    real = load_images(str(orig_dir / "manifest.csv"), image_size=SIZE, progress=False)
    assert np.array_equal(np.asarray(combined.images[:10]), np.asarray(real.images))
    only_synthetic = load_images(str(result.combined), where=["synthetic=True"], image_size=SIZE, progress=False)
    assert len(only_synthetic) == 12
    # The synthetic rows take the job's --where value, so the same filter selects original and synthetic training rows.
    train = load_images(str(result.combined), where=["split=train"], image_size=SIZE, progress=False)
    assert len(train) == int((original["split"] == "train").sum()) + 12


@pytest.mark.parametrize(
    "job, fragment",
    [
        (lambda d: gan_job(d, method="vae"), "--method must be gan or cyclegan"),
        (lambda d: gan_job(d, cyclegan=CycleGANOptions(source="red", target="blue")), "options of --method cyclegan"),
        (lambda d: cyclegan_job(d, cyclegan=CycleGANOptions(domain_column="colour")), "needs --from A --to B"),
        (lambda d: cyclegan_job(d, cyclegan=CycleGANOptions(source="common", target="rare")), "needs the rarity"),
        (lambda d: cyclegan_job(d, cyclegan=CycleGANOptions(domain_column="colour", source="red", target="pink")),
         "no rows with colour=pink"),
        (lambda d: cyclegan_job(d, n=10_000), "each is translated at most once"),
        (lambda d: gan_job(d, weights=d / "s.parquet", model=d), "not both"),
        (lambda d: gan_job(d, weights=d / "none.parquet"), "no such file"),
        (lambda d: gan_job(d, label="nosuch"), "not a column"),
        (lambda d: gan_job(d, merge_with=d / "x.txt"), "--merge-with"),
    ],
    ids=["method", "from-with-gan", "cyclegan-no-domains", "common-rare-no-weights", "unknown-domain", "n-too-large",
         "weights-and-model", "missing-weights", "unknown-label", "bad-merge"],
)
def test_bad_options_are_debias_errors(tmp_path, job, fragment):
    with pytest.raises(DebiasError, match=fragment):
        run_augment(job(tmp_path))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "diffusion"], "--method must be one of gan, cyclegan"),
        (["--method", "cyclegan", "--from", "red"], "needs --from A --to B"),
    ],
    ids=["method", "cyclegan-without-to"],
)
def test_cli_gives_one_line_errors(tmp_path, args, fragment):
    proc = subprocess.run(
        [sys.executable, "-m", "debias", "augment", "--data", SPURIOUS, "--n", "2", "--out", str(tmp_path / "o"), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and fragment in lines[0], proc.stderr
