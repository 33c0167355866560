"""The Python API (`import debias`): the README's example end to end, one input convention for every scoring method,
scikit-learn behaviour (clone, NotFittedError, sign convention), bring-your-own embeddings, and examples/."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import debias

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "builtin:shapes?n=400&rare=0.05"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("api") / "run"
    imgs = debias.load_images(SOURCE, image_size=32)
    vae = debias.train_vae(imgs, out=out, epochs=2, latent_dim=8, width=8, contrastive_min_steps=0, progress=False)
    return imgs, vae, out


def test_the_readme_example_runs_as_written(trained, tmp_path: Path) -> None:
    imgs, vae, out = trained
    assert isinstance(imgs.images, np.ndarray) and imgs.images.dtype == np.uint8 and imgs.images.shape[1:] == (32, 32, 3)
    assert debias.load_vae(out).config.latent_dim == 8

    audit = debias.RarityAudit(vae).fit(imgs)
    assert {"path", "rarity", "weight", "recon_error"} <= set(audit.scores_.columns)
    assert len(audit.scores_) == len(imgs) and audit.scores_["weight"].sum() == pytest.approx(1.0)
    # the planted rare group gets more than its share of the weight
    rare = audit.scores_["rare"].to_numpy() == 1
    assert audit.scores_["weight"][rare].mean() > audit.scores_["weight"][~rare].mean()
    w = audit.sampling_weights(imgs.subset(np.arange(50)))
    assert w.shape == (50,) and w.sum() == pytest.approx(1.0)

    encoder = debias.load_encoder(out)  # train_vae trained it into out/contrastive
    det = debias.NoveltyDetector(vae, encoder=encoder, target_fpr=0.05).fit(imgs)
    assert det.detector_.scorer.statistics[-1] == "embedding_knn"
    x = imgs.subset(np.arange(40))
    s = det.score_samples(x)
    np.testing.assert_allclose(det.decision_function(x), s - det.offset_)
    pred = det.predict(x)
    assert set(np.unique(pred)) <= {-1, 1}
    np.testing.assert_array_equal(pred == -1, det.decision_function(x) < 0)
    p = det.p_values(x)
    assert ((p > 0) & (p <= 1)).all()
    # sign convention: an image turned into noise is less normal than the training images
    noise = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    assert np.median(det.score_samples(noise)) < np.median(s)

    det.save(tmp_path / "det")
    again = debias.NoveltyDetector.load(tmp_path / "det")
    assert again.encoder is not None  # the encoder travels with the saved detector
    np.testing.assert_allclose(again.score_samples(x), s, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again.predict(x), pred)


def test_the_audit_with_the_run_encoder_is_the_command_s_default(trained, tmp_path: Path) -> None:
    """RarityAudit(vae, encoder=...) is `debias audit`'s default on a run that has an encoder (knn-recon's third term:
    the encoder features' kNN rarity); without the encoder it is `debias audit --no-encoder`."""
    from debias.pipelines.audit import AuditJob, run_audit

    imgs, vae, out = trained
    encoder = debias.load_encoder(out)
    with_encoder = debias.RarityAudit(vae, encoder=encoder).fit(imgs)
    assert with_encoder.estimator_.embedding_knn_ is not None
    cli = run_audit(AuditJob(model=out, data=SOURCE, out=tmp_path / "a", device="cpu", report=False, progress=False))
    assert cli.summary["contrastive_encoder"]["n_neighbors"] == 50
    assert cli.summary["contrastive_encoder"]["readout"] == "max"  # the encoder's last map by its maximum
    # the third term is the kNN rarity of the encoder's features at that readout, not at the training's mean
    from debias.density.detector import embed_images
    from debias.density.encoding import encode_images
    from debias.density.rarity import fit_audit_rarity

    enc = encode_images(vae, imgs, progress=False)
    direct = fit_audit_rarity(enc.mu, enc.recon_error, embeddings=embed_images(encoder, imgs, readout="max")).rarity
    np.testing.assert_allclose(with_encoder.rarity_, direct, rtol=1e-4, atol=1e-4)
    assert {"rarity_latent", "rarity_reconstruction", "rarity_embedding"} <= set(cli.scores.columns)
    np.testing.assert_allclose(cli.scores["rarity"], with_encoder.rarity_, rtol=1e-4, atol=1e-4)
    plain = run_audit(AuditJob(model=out, data=SOURCE, out=tmp_path / "b", device="cpu", report=False, progress=False,
                               use_encoder=False))
    assert plain.summary["contrastive_encoder"] is None and "rarity_embedding" not in plain.scores.columns
    np.testing.assert_allclose(plain.scores["rarity"], debias.RarityAudit(vae).fit(imgs).rarity_, rtol=1e-4, atol=1e-4)
    # new images are scored with their own features, against the fitted rows
    w = with_encoder.sampling_weights(imgs.subset(np.arange(30)))
    assert w.shape == (30,) and w.sum() == pytest.approx(1.0)


def test_every_input_kind_gives_the_same_scores(trained, tmp_path: Path) -> None:
    imgs, vae, _ = trained
    audit = debias.RarityAudit(vae).fit(imgs)
    u8 = np.array(imgs.images[:12])
    paths = []
    for i, arr in enumerate(u8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    ref = audit.score_samples(imgs.subset(np.arange(12)))
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    for x in (u8, as_float, [Image.fromarray(a) for a in u8], paths, [str(p) for p in paths]):
        np.testing.assert_allclose(audit.score_samples(x), ref, rtol=1e-5, atol=1e-5)
    # another size is brought to the model's size, as the CLI's decoder would: no caller resizes by hand
    big = np.stack([np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.NEAREST)) for a in u8])
    assert audit.score_samples(big).shape == (12,)
    grey = u8.mean(-1).astype(np.uint8)  # (N, H, W): made RGB for an RGB model
    assert np.isfinite(audit.score_samples(grey)).all()
    with pytest.raises(debias.DebiasError, match="float array"):
        audit.score_samples(as_float * 255)
    with pytest.raises(debias.DebiasError, match="cannot read images"):
        audit.score_samples(42)


def test_estimators_follow_scikit_learn(trained) -> None:
    imgs, vae, _ = trained
    for est in (debias.RarityAudit(vae, target_ess=0.3), debias.NoveltyDetector(vae, target_fpr=0.1),
                debias.LatentHistogramDensity(bins=8)):
        copy = clone(est)  # the model is deep-copied, like any non-estimator parameter
        params = {k: v for k, v in est.get_params().items() if k != "vae"}
        assert {k: v for k, v in copy.get_params().items() if k != "vae"} == params
        assert not hasattr(copy, "offset_") and not hasattr(copy, "scores_")
    with pytest.raises(NotFittedError):
        debias.RarityAudit(vae).score_samples(imgs)
    with pytest.raises(NotFittedError):
        debias.NoveltyDetector(vae).predict(imgs)
    with pytest.raises(NotFittedError):
        debias.LatentHistogramDensity().score_samples(np.zeros((3, 2)))


def test_bring_your_own_embeddings(trained) -> None:
    """Embeddings from a randomly initialised torchvision network (nothing downloaded), keyed by row."""
    import torchvision

    imgs, _, _ = trained
    net = torchvision.models.resnet18(weights=None, num_classes=32).eval()
    torch.manual_seed(0)
    with torch.inference_mode():
        emb = net(imgs.batch(np.arange(len(imgs)))).numpy()
    audit = debias.RarityAudit().fit(embeddings=emb)
    assert len(audit.scores_) == len(imgs) and audit.scores_["weight"].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(audit.sampling_weights(embeddings=emb[:10]).sum(), 1.0)
    with pytest.raises(debias.DebiasError, match="reconstruction"):
        debias.RarityAudit(estimator="knn-recon").fit(embeddings=emb)
    # novelty on embeddings: the held-out rows are mostly typical, rows far outside the cloud are novel
    det = debias.NoveltyDetector(target_fpr=0.1).fit(embeddings=emb[:300])
    held_out = det.predict(embeddings=emb[300:])
    far = emb[300:] + 50 * emb.std(0)
    assert np.mean(held_out == 1) > 0.7 and np.mean(det.predict(embeddings=far) == -1) > 0.9
    assert len(det.explain(embeddings=far[:3])) == 3
    with pytest.raises(debias.DebiasError, match="embeddings"):
        audit.score_samples(imgs)


def test_the_example_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import runpy

    monkeypatch.setattr(sys, "argv", ["audit_and_score.py", "--data", "builtin:shapes?n=300&rare=0.05", "--epochs", "1",
                                      "--width", "8", "--contrastive-min-steps", "0", "--out", str(tmp_path / "run")])
    runpy.run_path(str(ROOT / "examples" / "audit_and_score.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "rarest training images" in out and "called novel" in out


def test_the_readme_python_api_block_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code block of the README's "Python API" section, executed as written, on a small faces/manifest.csv
    made here from the built-in set (``other_imgs`` and ``x`` are the only names it leaves to the reader)."""
    import pandas as pd

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    faces = tmp_path / "faces"
    (faces / "images").mkdir(parents=True)
    imgs = debias.load_images("builtin:shapes?n=30&rare=0.1", image_size=64)
    rows = []
    for i, arr in enumerate(imgs.images):
        Image.fromarray(np.asarray(arr)).save(faces / "images" / f"{i}.png")
        rows.append({"path": f"images/{i}.png", "split": "train" if i < 24 else "test"})
    pd.DataFrame(rows).to_csv(faces / "manifest.csv", index=False)
    monkeypatch.chdir(tmp_path)
    namespace = {"other_imgs": "faces/manifest.csv", "x": [faces / "images" / "25.png", faces / "images" / "26.png"]}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["det"].predict(namespace["x"]).shape == (2,)
    assert (tmp_path / "det" / "novelty.pt").is_file() and (tmp_path / "runs" / "faces" / "model.pt").is_file()


def test_audit_cli_takes_embeddings_keyed_by_path(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pandas as pd
    import torchvision

    from debias.pipelines.cli import main

    def cli(*args: str) -> tuple[int, str, str]:  # the console script, in-process
        with pytest.raises(SystemExit) as stop:
            main(list(args))
        out, err = capsys.readouterr()
        return int(stop.value.code or 0), out, err

    imgs, _, _ = trained
    net = torchvision.models.resnet18(weights=None, num_classes=16).eval()
    torch.manual_seed(0)
    with torch.inference_mode():
        emb = net(imgs.batch(np.arange(len(imgs)))).numpy()
    pd.DataFrame({"path": imgs.table["path"], "embedding": list(emb)}).iloc[:-10].to_parquet(tmp_path / "e.parquet")
    args = ["audit", "--embeddings", str(tmp_path / "e.parquet"), "--data", SOURCE, "--out", str(tmp_path / "audit"),
            "--group-by", "rare", "-q"]
    code, out, err = cli(*args)
    assert code == 0, err
    scores = pd.read_parquet(tmp_path / "audit" / "scores.parquet")
    assert len(scores) == len(imgs) - 10 and scores["weight"].sum() == pytest.approx(1.0)
    assert "rows without one" in out and not (tmp_path / "audit" / "report.html").exists()
    code, _, err = cli(*args, "--model", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "one of the two" in err
    pd.DataFrame({"file": ["a"], "x": [1.0]}).to_parquet(tmp_path / "bad.parquet")
    code, _, err = cli(*args[:2], str(tmp_path / "bad.parquet"), *args[3:])
    assert code == 2 and "needs a 'path' column" in err