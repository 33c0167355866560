"""Novelty scoring: the scorer's statistics and conventions, conformal p-values, persistence, batch independence,
explanations and `debias score` end to end on a tiny trained model."""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from debias.data import ImageSet, load_images
from debias.density.calibration import ConformalCalibrator, drift_report
from debias.density.detector import (
    NOVELTY_FILE,
    file_sha256,
    fit_detector,
    open_detector,
)
from debias.density.encoding import encode_batch, encode_images
from debias.density.heatmaps import heatmap_png
from debias.density.novelty import (
    STATISTICS,
    NoveltyScorer,
    PixelDensity,
    feature_matrix,
    pixel_column,
    split_features,
)
from debias.errors import DebiasError
from debias.pipelines.cli import app as cli_app
from debias.training.vae import load_model
from tests.novelty_support import TINY_SOURCE, noise_images, tiny_run


def synthetic_features(n: int, d: int = 6, seed: int = 0) -> np.ndarray:
    """[mu | logvar | recon | pixel] of a well-behaved in-distribution population."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, d))
    logvar = rng.normal(-2.0, 0.1, size=(n, d))
    recon = np.exp(rng.normal(-4.0, 0.2, size=n))
    pixel = rng.normal(-1.5, 0.05, size=n)  # mean per-pixel log frequency
    return np.hstack([mu, logvar, recon[:, None], pixel[:, None]])


# -- conformal calibration -----------------------------------------------------------------------------------------
def test_p_values_by_hand():
    cal = ConformalCalibrator(target_fpr=0.25).fit([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    # (1 + #{cal >= s}) / (n + 1), n = 7
    np.testing.assert_allclose(cal.p_values([0.0, 3.0, 3.5, 7.0, 8.0]), np.array([8, 6, 5, 2, 1]) / 8)
    # p <= 0.25 <=> #{cal >= s} <= 1 <=> s > 6
    assert cal.threshold_ == 6.0
    np.testing.assert_array_equal(cal.is_novel([6.0, 6.5, 100.0]), [False, True, True])


def test_is_novel_agrees_with_p_value_rule():
    rng = np.random.default_rng(3)
    for n in (19, 99, 1000):
        for fpr in (0.01, 0.05, 0.1, 0.2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cal = ConformalCalibrator(target_fpr=fpr).fit(rng.normal(size=n))
            s = np.concatenate([rng.normal(size=500) * 2, cal.scores_])  # include exact ties with calibration scores
            np.testing.assert_array_equal(cal.is_novel(s), cal.p_values(s) <= fpr + 1e-12)


def test_too_few_calibration_scores_flag_nothing():
    with pytest.warns(UserWarning, match="cannot resolve"):
        cal = ConformalCalibrator(target_fpr=0.01).fit(np.arange(20.0))
    assert cal.threshold_ == np.inf and not cal.is_novel([1e9]).any()


def test_conformal_false_positive_rate_is_controlled():
    """Exchangeable inliers: P(p <= a) <= a. The guarantee is over the draw of the calibration set too, so average
    the realised rate over many random calibration/test splits; it must not exceed a by more than sampling noise."""
    X = synthetic_features(12000, seed=1)
    scorer = NoveltyScorer().fit(X[:4000])
    pool = scorer.novelty(X[4000:])
    rng = np.random.default_rng(0)
    reps, n_cal, n_test = 40, 500, 1000
    for a in (0.01, 0.05, 0.1, 0.3):
        rates = []
        for _ in range(reps):
            order = rng.permutation(len(pool))
            cal = ConformalCalibrator(target_fpr=a).fit(pool[order[:n_cal]])
            p = cal.p_values(pool[order[n_cal : n_cal + n_test]])
            assert p.min() >= 1 / (n_cal + 1) and p.max() <= 1.0
            rates.append((p <= a).mean())
        # per split: binomial noise of the test part plus the calibration quantile's own spread (~ Beta)
        sd = np.sqrt(a * (1 - a) * (1 / n_test + 1 / n_cal) / reps)
        assert np.mean(rates) <= a + 4 * sd, (a, np.mean(rates))


def test_drift_report_sees_a_shift():
    rng = np.random.default_rng(0)
    cal = ConformalCalibrator(target_fpr=0.05).fit(rng.normal(size=2000))
    same = drift_report(rng.normal(size=500), cal)
    shifted = drift_report(rng.normal(1.0, 1.0, size=500), cal)
    assert shifted["ks_statistic"] > same["ks_statistic"]
    assert shifted["ks_p_value"] < 1e-6 < same["ks_p_value"]
    assert shifted["fraction_novel"] > same["fraction_novel"]
    assert drift_report([], cal)["fraction_novel"] is None


# -- the scorer ------------------------------------------------------------------------------------------------------
def test_scorer_follows_sklearn_conventions():
    X = synthetic_features(500)
    scorer = NoveltyScorer(combine="fisher", bins=8)
    assert scorer.fit(X) is scorer
    assert clone(scorer).get_params() == scorer.get_params() and not hasattr(clone(scorer), "offset_")
    np.testing.assert_allclose(scorer.decision_function(X), scorer.score_samples(X) - scorer.offset_)
    np.testing.assert_allclose(scorer.novelty(X), -scorer.score_samples(X))
    assert set(np.unique(scorer.predict(X))) <= {-1, 1}
    # contamination is the expected rate on new images of the training distribution (a training image scored again
    # finds itself among the kNN references, so the fitted rows are not the right check)
    fresh = synthetic_features(2000, seed=5)
    assert (scorer.predict(fresh) == -1).mean() == pytest.approx(0.05, abs=0.02)
    with pytest.raises(RuntimeError, match="not fitted"):
        NoveltyScorer().score_samples(X)
    with pytest.raises(ValueError, match="combine"):
        NoveltyScorer(combine="sum").fit(X)
    with pytest.raises(ValueError, match="statistics"):
        NoveltyScorer(statistics=("elbo",)).fit(X)
    with pytest.raises(ValueError, match="features"):
        scorer.score_samples(X[:, :5])
    with pytest.raises(ValueError, match="at least 7 images"):
        NoveltyScorer().fit(X[:6])
    with pytest.raises(ValueError, match="pixel column"):
        NoveltyScorer().fit(X[:, :-1])  # the default statistics read the pixel column
    assert NoveltyScorer(statistics=("posterior_knn", "recon_error")).fit(X[:, :-1]).n_features_in_ == 13


def test_knn_statistic_leaves_each_fitted_row_out():
    """A fitted row's own posterior is not its nearest neighbour: the fitted kNN distances match those of the same
    rows scored as new images against the other references, so training and new images are on one scale."""
    X = synthetic_features(400)
    scorer = NoveltyScorer(statistics=("posterior_knn",), n_neighbors=3).fit(X)
    fitted = scorer._statistics(X[:50], self_rows=np.arange(50))[:, 0]
    for i in range(5):
        others = NoveltyScorer(statistics=("posterior_knn",), n_neighbors=3).fit(np.delete(X, i, axis=0))
        assert others.statistic_matrix(X[i : i + 1])[0, 0] == pytest.approx(fitted[i], rel=1e-9)
    assert np.isfinite(fitted).all() and fitted.min() > np.log(1e-6)


def test_reference_is_capped():
    X = synthetic_features(300)
    scorer = NoveltyScorer(max_reference=100).fit(X)
    assert scorer.reference_.shape == (100, 12)
    assert np.isfinite(scorer.novelty(X)).all()


@pytest.mark.parametrize("combine, min_auroc", [("fisher", 0.98), ("l1", 0.99), ("mahalanobis", 0.99)])
def test_too_typical_is_novel_too(combine, min_auroc):
    """The likelihood trap: simple outliers (a digit under a clothes model) that reconstruct *better* than any
    training image and whose pixels are *more* probable. The one-sided error ranks them as the most normal; the
    two-sided pixel density flags them (issue 16)."""
    X = synthetic_features(4000)
    scorer = NoveltyScorer(combine=combine).fit(X[:3000])
    inliers = X[3000:]
    trap = inliers.copy()
    trap[:, -2] = np.exp(-6.0)  # far lower error than training images (log error mean -4, sd 0.2)
    trap[:, -1] = -1.2  # pixels far more probable than usual (mean -1.5, sd 0.05)
    y = np.r_[np.zeros(len(inliers)), np.ones(len(trap))]
    assert roc_auc_score(y, np.r_[inliers[:, -2], trap[:, -2]]) < 0.01  # error alone: exactly backwards
    # Fisher's tails bottom out at 1 / (n + 1), so one extreme statistic among three moves it less than l1
    assert roc_auc_score(y, np.r_[scorer.novelty(inliers), scorer.novelty(trap)]) > min_auroc


def test_each_statistic_reacts_to_its_own_shift():
    X = synthetic_features(3000)
    mu, logvar, recon = split_features(X)
    pix = pixel_column(X)[:, None]
    for name, shifted in {
        "posterior_knn": np.hstack([mu * 3, logvar, recon[:, None], pix]),
        "latent_mahalanobis": np.hstack([mu * 3, logvar, recon[:, None], pix]),
        "recon_error": np.hstack([mu, logvar, recon[:, None] * 20, pix]),
        "posterior_logvar": np.hstack([mu, logvar + 2, recon[:, None], pix]),
        "pixel_density": np.hstack([mu, logvar, recon[:, None], pix - 0.5]),
    }.items():
        scorer = NoveltyScorer(statistics=(name,)).fit(X[:2000])
        assert np.median(scorer.novelty(shifted[2000:])) > np.quantile(scorer.novelty(X[2000:]), 0.99), name
    E = np.random.default_rng(1).normal(size=(3000, 4))
    scorer = NoveltyScorer(statistics=("embedding_knn",)).fit(X[:2000], embeddings=E[:2000])
    assert np.median(scorer.novelty(X[2000:], embeddings=E[2000:] * 3)) > np.quantile(
        scorer.novelty(X[2000:], embeddings=E[2000:]), 0.99)
    every = NoveltyScorer(statistics=STATISTICS).fit(X, embeddings=E)
    assert len(every.statistic_matrix(X[:3], embeddings=E[:3]).T) == len(STATISTICS)


def test_top_dims_point_at_the_shifted_dimension():
    X = synthetic_features(3000)
    scorer = NoveltyScorer().fit(X[:2000])
    odd = X[2000:2010].copy()
    odd[:, 4] = 6.0  # far outside the training range of dimension 4
    tops = scorer.top_dims(odd, k=3)
    assert all(t[0]["dim"] == 4 and t[0]["value"] == 6.0 for t in tops)
    assert all(0 < d["tail"] <= 1 for t in tops for d in t) and all(len(t) == 3 for t in tops)
    # ordered by each dimension's share of the squared distance to the nearest training posteriors (issue 15)
    assert all(t[0]["distance_share"] >= t[1]["distance_share"] >= t[2]["distance_share"] for t in tops)
    assert all(t[0]["distance_share"] > 0.5 for t in tops)


def test_the_explanation_names_the_statistic_behind_the_verdict():
    """Issues 15 and 16: a latent outlier is explained by the latent distance, a badly reconstructed but otherwise
    typical image by its reconstruction error, an image with unusual pixels by the pixel density; the score adds up
    the terms that the driver is the largest of."""
    X = synthetic_features(3000)
    scorer = NoveltyScorer().fit(X[:2000])
    far, blurry, odd_pixels = X[2000:2001].copy(), X[2001:2002].copy(), X[2002:2003].copy()
    far[:, 2] = 7.0
    blurry[:, -2] = np.exp(-1.0)  # training recon errors are exp(-4 +- 0.2)
    odd_pixels[:, -1] = -2.5  # training pixel densities are -1.5 +- 0.05
    rows = np.vstack([far, blurry, odd_pixels])
    out = scorer.analyse(rows, k=2)
    assert out["driver"] == ["posterior_knn", "recon_error", "pixel_density"]
    z = out["statistics"]
    assert z[0]["posterior_knn"] > 3 and abs(z[0]["recon_error"]) < 3
    assert z[1]["recon_error"] > 10 and z[1]["recon_error"] > z[1]["posterior_knn"]
    assert z[2]["pixel_density"] < -10
    # fisher: -2 sum log p of the tails; the driver's tail is the smallest, at the floor 1 / (n + 1) here
    n = 2000
    assert all(out["novelty"] >= -2 * np.log(1 / (n + 1)))
    np.testing.assert_allclose(out["novelty"], scorer.novelty(rows))
    assert out["top_dims"][0][0]["dim"] == 2
    # l1: the sum of the terms (the kNN and error terms count only above the mean)
    l1 = NoveltyScorer(combine="l1").fit(X[:2000]).analyse(rows, k=2)
    assert l1["driver"] == out["driver"]
    expected = [max(v["posterior_knn"], 0.0) + max(v["recon_error"], 0.0) + abs(v["pixel_density"])
                for v in l1["statistics"]]
    np.testing.assert_allclose(l1["novelty"], expected)


def test_pixel_density_by_hand():
    """Per-pixel histograms: the score is the mean over positions of log((count + alpha) / (n + alpha * bins))."""
    imgs = np.zeros((4, 1, 1, 2), dtype=np.float32)  # 4 images of 2 pixels
    imgs[:, 0, 0, 0] = [0.0, 0.0, 0.0, 1.0]  # pixel 0: bins 0, 0, 0, 1 (1.0 is in the last bin)
    imgs[:, 0, 0, 1] = [0.49, 0.51, 0.99, 0.2]  # pixel 1: bins 0, 1, 1, 0
    dens = PixelDensity(bins=2, alpha=1.0).fit(imgs)
    assert dens.n_features_in_ == 2 and dens.n_samples_fit_ == 4
    p = lambda count: np.log((count + 1.0) / (4 + 2.0))  # noqa: E731
    np.testing.assert_allclose(dens.score_samples(imgs[:1]), [(p(3) + p(2)) / 2])
    np.testing.assert_allclose(dens.score_samples(imgs[3:]), [(p(1) + p(2)) / 2])
    halves = PixelDensity(bins=2).partial_fit(imgs[:2]).partial_fit(imgs[2:])
    np.testing.assert_array_equal(halves.log_prob_, dens.log_prob_)
    assert clone(dens).get_params() == dens.get_params() and not hasattr(clone(dens), "log_prob_")
    with pytest.raises(ValueError, match="values"):
        dens.score_samples(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="float pixel values"):
        dens.score_samples(np.zeros((1, 1, 1, 2), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelDensity().score_samples(imgs)


# -- on a tiny trained model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("novelty") / "run")


@pytest.fixture
def data(run) -> ImageSet:
    return load_images(TINY_SOURCE, image_size=32, channels=3, progress=False)


def test_encode_batch_matches_encode_images(run, data):
    model, _ = load_model(run)
    ref = encode_images(model, data, batch_size=64, progress=False)
    enc, recon = encode_batch(model, data.batch(slice(0, 64)))
    np.testing.assert_allclose(enc.mu, ref.mu[:64], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc.recon_error, ref.recon_error[:64], rtol=1e-5, atol=1e-7)
    assert recon.shape == (64, 3, 32, 32)


def test_score_does_not_depend_on_batch_mates(run, data):
    det = open_detector(run, progress=False)
    x = data.batch(np.arange(24))
    together = det.score_batch(x)
    other_mates = det.score_batch(torch.cat([x[12:], torch.rand(9, 3, 32, 32), x[:12]]))
    tol = 1.0 / (det.calibrator.n_calibration_ + 1)
    for i in range(24):
        alone = det.score_batch(x[i : i + 1])
        j = i + 21 if i < 12 else i - 12  # where image i sits among other_mates
        for res, k in ((together, i), (other_mates, j)):
            for name, value in alone.statistics[0].items():
                assert res.statistics[k][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
            # The fisher score is rank-based: a statistic within rounding of a fitted value can move one rank of its
            # tail, i.e. -2 log of a ratio (c + 2) / (c + 1) <= 2, at most 2 log 2 per statistic, times its weight.
            assert abs(res.novelty[k] - alone.novelty[0]) <= 2 * np.log(2) * det.scorer._weight_vector().sum() + 1e-9
            assert abs(res.p_value[k] - alone.p_value[0]) <= tol + 1e-12  # at most one calibration rank
            assert res.top_dims[k][0]["dim"] == alone.top_dims[0][0]["dim"] or res.top_dims[k][0][
                "distance_share"] == pytest.approx(alone.top_dims[0][0]["distance_share"])
            assert res.driver[k] == alone.driver[0]


def test_detector_is_stored_reloaded_and_refitted_when_the_model_changes(run):
    (run / NOVELTY_FILE).unlink(missing_ok=True)
    first = open_detector(run, progress=False)
    assert (run / NOVELTY_FILE).is_file()
    card = first.card
    assert card["calibration_size"] == 60 and card["fitted_on"]["n_fit"] == 240
    again = open_detector(run, progress=False)
    assert again.card["fitted_at"] == card["fitted_at"]  # loaded, not refitted
    np.testing.assert_array_equal(again.calibrator.scores_, first.calibrator.scores_)
    # a different target FPR is a different threshold on the same stored calibration scores
    strict = open_detector(run, target_fpr=0.02, progress=False)
    assert strict.calibrator.threshold_ >= first.calibrator.threshold_ and strict.card["target_fpr"] == 0.02
    # a changed model.pt (same architecture) invalidates novelty.pt
    model, meta = load_model(run)
    with torch.no_grad():
        model.head.bias.add_(0.01)
    blob = torch.load(run / "model.pt", weights_only=True)
    blob["model"] = model.state_dict()
    torch.save(blob, run / "model.pt")
    refit = open_detector(run, progress=False)
    assert refit.card["model_sha256"] != card["model_sha256"]


def test_cached_tables_are_not_stored_and_a_reloaded_detector_scores_the_same(run, monkeypatch):
    """The per-call caches (reference norms of the kNN search, sorted histogram tail tables) are rebuilt on use, never
    written to novelty.pt; a detector loaded from the file scores exactly as the one that built them."""
    (run / NOVELTY_FILE).unlink(missing_ok=True)
    first = open_detector(run, progress=False)
    x = torch.rand(5, first.channels, first.image_size, first.image_size, generator=torch.Generator().manual_seed(0))
    before = first.score_batch(x)
    assert hasattr(first.scorer, "_reference_cache") and hasattr(first.scorer.density_, "_tail_cache")
    _, _, norms = first.scorer._reference_cache["posterior"]
    np.testing.assert_allclose(norms, (first.scorer.reference_ ** 2).sum(1), rtol=1e-12)
    first.save(run / NOVELTY_FILE, file_sha256(run / "model.pt"), file_sha256(run / "contrastive" / "encoder.pt"))
    stored = torch.load(run / NOVELTY_FILE, weights_only=True)["scorer"]["state"]
    assert not [k for k in stored if k.startswith("_")]
    assert not [k for k in stored["density_"]["state"] if k.startswith("_")]
    monkeypatch.setattr("debias.density.detector.fit_detector", lambda *a, **k: pytest.fail("refitted, not loaded"))
    loaded = open_detector(run, progress=False)
    assert not hasattr(loaded.scorer, "_reference_cache")  # the file held no cache
    after = loaded.score_batch(x)
    np.testing.assert_array_equal(after.novelty, before.novelty)
    assert after.top_dims == before.top_dims and after.driver == before.driver


def test_a_refitted_scorer_does_not_reuse_the_previous_fits_caches():
    """Refitting replaces the references and the histograms: scores equal those of a fresh fit on the new data, even
    when the reference count is the same (the norms cache is keyed on the array, not its length)."""
    a, b = synthetic_features(300, seed=1), synthetic_features(300, seed=2) + 0.5
    q = synthetic_features(20, seed=3)
    scorer = NoveltyScorer(statistics=("posterior_knn",), max_reference=100).fit(a)
    scorer.novelty(q)
    scorer.density_.per_dim_tail(q[:, :6])  # fills both caches
    fresh = NoveltyScorer(statistics=("posterior_knn",), max_reference=100).fit(b)
    np.testing.assert_allclose(scorer.fit(b).novelty(q), fresh.novelty(q), rtol=1e-12)
    assert scorer.top_dims(q) == fresh.top_dims(q)


def test_novelty_file_is_loaded_safely(run, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    open_detector(run, progress=False)
    torch.save({"format": 1, "payload": Evil()}, run / NOVELTY_FILE)
    with pytest.raises(DebiasError, match="cannot load"):
        open_detector(run, progress=False)
    assert not (tmp_path / "pwned").exists()
    (run / NOVELTY_FILE).unlink()


def test_fit_needs_enough_images(run, data):
    model, meta = load_model(run)
    with pytest.raises(DebiasError, match="cannot split"):
        fit_detector(model, data.subset(np.arange(2)), meta=meta, progress=False)


def test_heatmap_png(run, data):
    model, _ = load_model(run)
    x = data.batch([0])
    _, recon = encode_batch(model, x)
    png = heatmap_png(x[0].numpy(), recon[0].numpy())
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (3 * 128, 128)
    err = np.asarray(img)[:, 256:]
    assert err.std() > 0  # the error panel is not blank


def test_score_command_end_to_end(run, tmp_path):
    """`debias score`: in-distribution images are rarely flagged, noise images mostly are; outputs are complete."""
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    for i, img in enumerate(noise_images(40)):
        Image.fromarray(img).save(noise_dir / f"noise_{i:02d}.png")
    runner = CliRunner()
    out_in, out_noise = tmp_path / "in", tmp_path / "noise_scores"
    res = runner.invoke(
        cli_app, ["score", "--model", str(run), "--data", TINY_SOURCE, "--where", "split=test", "--out", str(out_in),
                  "--heatmaps", "2", "-q"],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli_app, ["score", "--model", str(run), "--data", str(noise_dir), "--out", str(out_noise),
                                  "--heatmaps", "1", "-q"])
    assert res.exit_code == 0, res.output
    heat = json.loads((out_noise / "summary.json").read_text())["heatmaps"]
    assert len(heat) == 1 and heat[0].endswith(".png") and not heat[0].endswith(".png.png")  # no doubled extension
    assert "novel" in res.output

    scores = pd.read_parquet(out_in / "scores.parquet")
    assert len(scores) == len(pd.read_csv(out_in / "scores.csv")) and set(scores["split"]) == {"test"}
    for col in ("path", "shape", "novelty", "p_value", "is_novel", "rarity", "recon_error", "novelty_rank", "top_dims"):
        assert col in scores.columns, col
    assert scores["p_value"].between(1 / 61, 1).all()
    dims = json.loads(scores["top_dims"].iloc[0])
    assert len(dims) == 5 and {"dim", "distance_share", "tail", "value"} <= set(dims[0])
    stats = {"posterior_knn", "recon_error", "pixel_density", "embedding_knn"}  # the run has a contrastive encoder
    assert set(scores["driver"]) <= stats and set(json.loads(scores["statistics"].iloc[0])) == stats
    noise = pd.read_parquet(out_noise / "scores.parquet")
    assert noise["is_novel"].mean() > 0.9 > 0.3 > scores["is_novel"].mean()
    assert roc_auc_score(np.r_[np.zeros(len(scores)), np.ones(len(noise))], np.r_[scores["novelty"], noise["novelty"]]) > 0.95
    summary = json.loads((out_in / "summary.json").read_text())
    assert summary["n_images"] == len(scores) and summary["detector"]["calibration_size"] == 60
    assert len(summary["heatmaps"]) == 2 and all((out_in / "heatmaps" / h).is_file() for h in summary["heatmaps"])


def test_score_command_errors_are_one_line(run, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli_app, ["score", "--model", str(tmp_path / "none"), "--data", TINY_SOURCE, "--out", str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, DebiasError) and "no trained model" in str(res.exception)
    res = runner.invoke(
        cli_app, ["score", "--model", str(run), "--data", TINY_SOURCE, "--out", str(tmp_path), "--target-fpr", "0"]
    )
    assert isinstance(res.exception, DebiasError) and "--target-fpr" in str(res.exception)
    res = runner.invoke(
        cli_app, ["score", "--model", str(run), "--data", TINY_SOURCE, "--out", str(tmp_path), "--refit",
                  "--fit-data", str(tmp_path / "missing")]
    )
    assert isinstance(res.exception, DebiasError) and "no such file" in str(res.exception)


def test_feature_matrix_round_trip(run, data):
    model, _ = load_model(run)
    enc, _ = encode_batch(model, data.batch(slice(0, 5)))
    X = feature_matrix(enc)
    mu, logvar, recon = split_features(X)
    np.testing.assert_array_equal(mu, enc.mu)
    np.testing.assert_array_equal(logvar, enc.logvar)
    np.testing.assert_array_equal(recon, enc.recon_error)
    assert pixel_column(X) is None
    pixel = np.arange(5.0)
    X2 = feature_matrix(enc, pixel)
    np.testing.assert_array_equal(pixel_column(X2), pixel)
    for a, b in zip(split_features(X2), (mu, logvar, recon)):
        np.testing.assert_array_equal(a, b)


def test_the_detector_calibrates_on_the_images_training_held_out(run):
    """`debias train` keeps a seeded 20 % out of training; the detector fitted on the model's own data calibrates on
    exactly those images (never seen by the model), and on a random part when the data changed."""
    from debias.data.splits import calibration_split
    from debias.runtime.checkpoint import load_checkpoint

    meta = load_checkpoint(run / "model.pt")["data"]
    assert meta["calibration_fraction"] == 0.2 and meta["n_calibration"] == 60 and meta["n_images"] == 300
    (run / NOVELTY_FILE).unlink(missing_ok=True)
    det = open_detector(run, progress=False)
    assert det.card["calibration_held_out_of_training"] and det.card["calibration_size"] == 60
    # the calibration scores are those of the held-out rows, recomputed here
    data = load_images(meta["source"], image_size=det.image_size, channels=det.channels, progress=False)
    _, held_out = calibration_split(len(data), 0.2, meta["calibration_seed"])
    novelty = det.score_dataset(data.subset(held_out), progress=False).novelty
    np.testing.assert_allclose(np.sort(novelty), np.sort(det.calibrator.scores_), rtol=1e-6, atol=1e-9)
    refit = open_detector(run, progress=False, fit_data=meta["source"], refit=True)
    assert not refit.card["calibration_held_out_of_training"]  # --fit-data: a random split of those images


def test_weights_scale_each_statistics_term_and_are_checked():
    """Weighted Fisher: a statistic's -log p counts ``weights[name]`` times; the driver is the largest weighted term."""
    X = synthetic_features(600)
    plain = NoveltyScorer().fit(X[:400])
    heavy = clone(NoveltyScorer(weights={"pixel_density": 3.0})).fit(X[:400])
    S = plain.statistic_matrix(X[400:])
    tails = -plain._log_tails(S)
    np.testing.assert_allclose(heavy.novelty(X[400:]), 2 * (tails[:, 0] + tails[:, 1] + 3 * tails[:, 2]))
    np.testing.assert_allclose(plain.novelty(X[400:]), 2 * tails.sum(1))
    for bad in ({"kl": 2.0}, {"pixel_density": 0.0}, {"pixel_density": float("nan")}):
        with pytest.raises(ValueError, match="weights must"):
            NoveltyScorer(weights=bad).fit(X[:400])
