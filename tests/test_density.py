"""LatentHistogramDensity against small cases computed by hand, plus the properties the audit relies on."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from debias.density.estimators import LatentHistogramDensity, effective_sample_size


def test_one_dim_hand_computed():
    # bins=2 over [0, 1]: edges 0, .5, 1 -> counts (3, 1) -> Q = (.75, .25)
    Z = np.array([[0.0], [0.1], [0.2], [1.0]])
    d = LatentHistogramDensity(whiten=False, bins=2, alpha=0.0, temperature=1.0).fit(Z)
    np.testing.assert_allclose(d.edges_[0], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(d.probs_[0], [0.75, 0.25])
    np.testing.assert_allclose(d.score_samples(Z), np.log([0.75, 0.75, 0.75, 0.25]))
    # Eq. 4 untempered: W ∝ 1/Q = (4/3, 4/3, 4/3, 4) -> sum 8
    np.testing.assert_allclose(d.sampling_weights(Z), [1 / 6, 1 / 6, 1 / 6, 1 / 2])


def test_two_dim_product_with_smoothing():
    # dim 0: values 0,0,0,1 -> Q0 = (.75, .25); dim 1: values 0,1,1,1 -> Q1 = (.25, .75)
    Z = np.array([[0, 0], [0, 1], [0, 1], [1, 1]], dtype=float)
    alpha = 0.05
    d = LatentHistogramDensity(whiten=False, bins=2, alpha=alpha, temperature=1.0).fit(Z)
    q = np.array([[0.75, 0.25], [0.75, 0.75], [0.75, 0.75], [0.25, 0.75]]) + alpha
    np.testing.assert_allclose(d.score_samples(Z), np.log(q).sum(1))
    w = 1 / q.prod(1)
    np.testing.assert_allclose(d.sampling_weights(Z), w / w.sum())


def test_temperature_scales_log_weights():
    Z = np.array([[0.0], [0.1], [0.2], [1.0]])
    d = LatentHistogramDensity(whiten=False, bins=2, alpha=0.0, temperature=0.5).fit(Z)
    w = np.array([0.75, 0.75, 0.75, 0.25]) ** -0.5
    np.testing.assert_allclose(d.sampling_weights(Z), w / w.sum())
    assert LatentHistogramDensity(whiten=False, bins=2, temperature=0.0).fit(Z).ess_ == pytest.approx(4.0)


def _lab_max_rule(Z, bins, alpha):
    """The public MIT lab's get_training_sample_probabilities, restated independently (with a correct last bin)."""
    p_out = np.zeros(Z.shape[0])
    for i in range(Z.shape[1]):
        hist, edges = np.histogram(Z[:, i], bins=bins, density=True)
        hist = hist / hist.sum()
        idx = np.clip(np.digitize(Z[:, i], edges) - 1, 0, bins - 1)
        p = 1.0 / (hist[idx] + alpha)
        p = p / p.sum()
        p_out = np.maximum(p, p_out)
    return p_out / p_out.sum()


def test_max_rule_matches_lab():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(500, 6))
    d = LatentHistogramDensity(whiten=False, bins=10, alpha=0.001, combine="max").fit(Z)
    np.testing.assert_allclose(d.sampling_weights(Z), _lab_max_rule(Z, 10, 0.001), rtol=1e-10)
    # higher score = more typical: the score orders samples opposite to the weight
    assert np.corrcoef(d.score_samples(Z), d.sampling_weights(Z))[0, 1] < 0


def test_product_in_log_space_over_many_dims():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(2000, 128))
    untempered = LatentHistogramDensity(temperature=1.0).fit(Z)
    w = untempered.sampling_weights(Z)
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    # the untempered 128-d product collapses onto a handful of samples ...
    assert untempered.ess_ < 20
    # ... while auto tempering meets the requested effective sample size
    auto = LatentHistogramDensity(temperature="auto", target_ess=0.5).fit(Z)
    assert auto.ess_ == pytest.approx(1000, rel=0.01)
    assert effective_sample_size(auto.sampling_weights(Z)) == pytest.approx(auto.ess_)
    # tempering keeps the order of the product: rarer = heavier
    assert np.corrcoef(np.log(auto.sampling_weights(Z)), np.log(w))[0, 1] > 0.999


def test_effective_sample_size():
    assert effective_sample_size(np.ones(10)) == pytest.approx(10)
    assert effective_sample_size(np.array([1.0, 0, 0])) == pytest.approx(1)
    assert effective_sample_size(np.array([3.0, 1.0])) == pytest.approx(16 / 10)


def test_rare_cluster_scores_rare():
    rng = np.random.default_rng(2)
    common = rng.normal(0, 1, size=(980, 8))
    rare = rng.normal(0, 1, size=(20, 8))
    rare[:, 3] += 6  # rare on one dimension only
    Z = np.vstack([common, rare])
    d = LatentHistogramDensity().fit(Z)
    w = d.sampling_weights(Z)
    assert w[980:].mean() > 2.5 * w[:980].mean()
    assert (d.score_samples(Z)[980:] < np.median(d.score_samples(Z)[:980])).all()


def test_active_dims_drop_collapsed():
    rng = np.random.default_rng(3)
    Z = np.hstack([rng.normal(size=(300, 3)), 1e-3 * rng.normal(size=(300, 2))])
    assert LatentHistogramDensity(whiten=False, dims="active").fit(Z).dims_.tolist() == [0, 1, 2]
    assert LatentHistogramDensity(whiten=False, dims=[4, 1]).fit(Z).dims_.tolist() == [4, 1]
    with pytest.raises(ValueError):
        LatentHistogramDensity(dims=[7]).fit(Z)


def test_whiten_finds_jointly_rare_points():
    # Two strongly correlated dims; the rare points sit off the diagonal, where each marginal is ordinary.
    rng = np.random.default_rng(4)
    t = rng.normal(size=2000)
    common = np.stack([t, t + 0.05 * rng.normal(size=2000)], 1)
    rare = np.array([[1.0, -1.0], [-1.0, 1.0], [0.8, -0.8]])
    Z = np.vstack([common, rare])
    plain = LatentHistogramDensity(whiten=False, bins=20).fit(Z).sampling_weights(Z)
    white = LatentHistogramDensity(bins=20, whiten=True).fit(Z).sampling_weights(Z)
    assert white[-3:].mean() > 10 * plain[-3:].mean()


def test_out_of_range_values_use_edge_bins():
    Z = np.array([[0.0], [0.4], [0.6], [1.0]])
    d = LatentHistogramDensity(whiten=False, bins=2, alpha=0.0).fit(Z)
    np.testing.assert_allclose(d.score_samples(np.array([[-5.0], [7.0]])), np.log([0.5, 0.5]))


def test_sklearn_conventions():
    params = dict(bins=7, alpha=0.01, combine="product", temperature=0.3, target_ess=0.4, dims="active",
                  active_threshold=0.2, whiten=True, contamination=0.1)
    d = LatentHistogramDensity(**params)
    assert {k: getattr(d, k) for k in params} == params
    assert not [k for k in vars(d) if k.endswith("_")]
    with pytest.raises(NotFittedError):
        d.score_samples(np.zeros((2, 2)))
    assert clone(d).get_params() == d.get_params()  # a real BaseEstimator
    Z = np.random.default_rng(5).normal(size=(400, 4))
    assert d.fit(Z) is d
    np.testing.assert_allclose(d.decision_function(Z), d.score_samples(Z) - d.offset_)
    assert (d.predict(Z) == -1).mean() == pytest.approx(0.1, abs=0.03)
    with pytest.raises(ValueError):
        d.score_samples(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        LatentHistogramDensity(combine="mean").fit(Z)
    with pytest.raises(ValueError):
        LatentHistogramDensity().fit(np.array([[np.nan, 1.0]]))


def test_per_dim_tail_hand_computed():
    # Q = (.75, .25): the rare bin's tail mass is .25, the common bin's is 1 (every bin is at most as likely)
    Z = np.array([[0.0], [0.1], [0.2], [1.0]])
    d = LatentHistogramDensity(whiten=False, bins=2).fit(Z)
    np.testing.assert_allclose(d.per_dim_tail(Z)[:, 0], [1.0, 1.0, 1.0, 0.25])


def test_active_after_whitening_keeps_leading_components():
    rng = np.random.default_rng(6)
    signal = rng.normal(size=(1000, 2)) @ np.array([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    Z = signal + 0.01 * rng.normal(size=(1000, 4))  # rank-2 data embedded in 4 dims
    d = LatentHistogramDensity(whiten=True, dims="active").fit(Z)
    assert d.components_.shape == (2, 4) and d.edges_.shape[0] == 2
    assert d.dims_.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(d.score_samples(Z[:5]), LatentHistogramDensity(whiten=True, dims="active").fit(Z).score_samples(Z[:5]))
    plain = LatentHistogramDensity(whiten=False, dims="active").fit(Z)
    assert plain.dims_.tolist() == [0, 1, 2, 3]  # every raw dimension has spread


# -- kNN density and tempering (issue 12) ------------------------------------------------------------------------
def test_knn_density_matches_hand_computed_distances():
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    from debias.density.estimators import KNNDensity

    X = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    est = KNNDensity(n_neighbors=1, n_components=None)
    with pytest.raises(NotFittedError):
        est.score_samples(X)
    est.fit(X)
    # leave-one-out: each fitted row's nearest other row is 1 away, the outlier's is 7 away; d = 1 dimension
    np.testing.assert_allclose(est.score_fitted(), [0.0, 0.0, 0.0, 0.0, -np.log(7.0)], atol=1e-12)
    np.testing.assert_allclose(est.score_samples(np.array([[5.0], [2.5]])), [-np.log(2.0), -np.log(0.5)])
    two = KNNDensity(n_neighbors=2, n_components=None).fit(X)
    np.testing.assert_allclose(two.score_samples(np.array([[5.0]])), [-np.log(3.0)])  # 2nd nearest: 2 (3 away)
    assert clone(est).get_params() == est.get_params() and not hasattr(clone(est), "components_")
    assert est.predict(np.array([[1.5], [50.0]])).tolist() == [1, -1]


def test_knn_density_sees_a_rare_combination_that_marginals_miss():
    """Two common clusters, (0,0) and (1,1), and a rare (0,1) combination: every coordinate value is common, so the
    product of per-dimension histograms cannot single it out; the kNN density can."""
    from debias.density.estimators import KNNDensity, LatentHistogramDensity

    rng = np.random.default_rng(0)
    common = np.repeat([[0.0, 0.0], [1.0, 1.0]], 200, axis=0)
    rare = np.repeat([[0.0, 1.0]], 8, axis=0)
    X = np.vstack([common, rare]) + rng.normal(0, 0.05, (408, 2))
    is_rare = np.r_[np.zeros(400), np.ones(8)].astype(bool)
    knn = -KNNDensity(n_neighbors=10, n_components=None).fit(X).score_fitted()
    hist = -LatentHistogramDensity(whiten=False).fit(X).score_samples(X)
    assert knn[is_rare].min() > np.quantile(knn[~is_rare], 0.99)
    assert hist[is_rare].mean() < np.quantile(hist[~is_rare], 0.9)


def test_temperature_for_ess_meets_its_target():
    from debias.density.estimators import effective_sample_size, temperature_for_ess

    rarity = np.random.default_rng(1).normal(size=500) * 3
    for target in (0.2, 0.5, 0.9):
        t = temperature_for_ess(rarity, target)
        w = np.exp(t * rarity - (t * rarity).max())
        assert effective_sample_size(w) / 500 == pytest.approx(target, abs=1e-3)


# ---- issue 15: the audit's rarity estimators, on cases small enough to compute by hand -------------------------


def test_knn_density_is_minus_d_log_of_the_kth_neighbour_distance():
    from debias.density.estimators import KNNDensity

    Z = np.array([[0.0], [1.0], [3.0], [6.0], [16.0]])
    est = KNNDensity(n_neighbors=1, n_components=None).fit(Z)
    # Leaving each row out, the nearest other row lies at 1, 1, 2, 3 and 10; d = 1.
    np.testing.assert_allclose(est.score_fitted(), -np.log([1, 1, 2, 3, 10]), atol=1e-9)
    np.testing.assert_allclose(est.score_samples(np.array([[4.0], [20.0]])), -np.log([1.0, 4.0]), atol=1e-9)


def test_latent_and_reconstruction_rarity_adds_two_robust_z_scores():
    from debias.density.rarity import (
        LatentAndReconstructionRarity,
        audit_features,
        fitted_rarity,
    )

    mu = np.array([[0.0], [1.0], [3.0], [6.0], [16.0]])
    recon = np.exp(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    est = LatentAndReconstructionRarity(n_neighbors=1, n_components=None)
    rarity = fitted_rarity(est, audit_features(mu, recon))
    # kNN part: log r_k = log(1, 1, 2, 3, 10); median log 2; MAD = median |.| = log 2 (normal-consistent x 1.4826).
    log_r = np.log([1.0, 1.0, 2.0, 3.0, 10.0])
    z_latent = (log_r - np.log(2)) / (1.4826 * np.log(2))
    # reconstruction part: log error = 0..4; median 2; MAD 1.
    z_recon = (np.arange(5.0) - 2.0) / 1.4826
    np.testing.assert_allclose(rarity, z_latent + z_recon, atol=1e-9)
    parts = est.components(audit_features(mu, recon), fitted=True)
    np.testing.assert_allclose(parts["latent"], z_latent, atol=1e-9)
    np.testing.assert_allclose(parts["reconstruction"], z_recon, atol=1e-9)
    # a new row: its neighbour distance is to the fitted rows (none left out)
    new = audit_features(np.array([[4.0]]), np.array([np.exp(2.0)]))
    np.testing.assert_allclose(-est.score_samples(new), (np.log(1.0) - np.log(2)) / (1.4826 * np.log(2)) + 0.0)
    assert clone(est).get_params() == est.get_params()


def test_the_embedding_term_is_a_third_robust_z_score_at_its_own_k():
    from debias.density.rarity import (
        LatentAndReconstructionRarity,
        audit_features,
        fit_audit_rarity,
        fitted_rarity,
        rarity_of_new_rows,
    )
    from debias.errors import DebiasError

    mu = np.array([[0.0], [1.0], [3.0], [6.0], [16.0]])
    recon = np.exp(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    emb = np.array([[0.0, 0.0], [0.0, 2.0], [0.0, 3.0], [0.0, 7.0], [0.0, 8.0]])
    X = audit_features(mu, recon, emb)
    assert X.shape == (5, 4)
    without = fitted_rarity(LatentAndReconstructionRarity(n_neighbors=1, n_components=None), audit_features(mu, recon))
    est = LatentAndReconstructionRarity(n_neighbors=1, n_components=None, embedding_dims=2, embedding_neighbors=2)
    rarity = fitted_rarity(est, X)
    # embeddings at 0, 2, 3, 7, 8 on one axis: 2nd-nearest other row at 3, 2, 3, 4, 5; KNNDensity keeps both axes
    # (d = 2), so the kNN rarity is 2 log r: median 2 log 3, MAD 2 * median |log r - log 3| = 2 log(4/3)
    log_r = np.log([3.0, 2.0, 3.0, 4.0, 5.0])
    z_emb = (log_r - np.log(3)) / (1.4826 * np.log(4 / 3))
    np.testing.assert_allclose(est.components(X, fitted=True)["embedding"], z_emb, atol=1e-9)
    np.testing.assert_allclose(rarity, without + z_emb, atol=1e-9)
    weighted = LatentAndReconstructionRarity(n_neighbors=1, n_components=None, embedding_dims=2, embedding_neighbors=2,
                                             embedding_weight=0.0)
    np.testing.assert_allclose(fitted_rarity(weighted, X), without, atol=1e-9)
    # new rows need their embeddings; scored against every fitted row
    with pytest.raises(DebiasError, match="embeddings"):
        rarity_of_new_rows(est, mu[:1], recon[:1])
    new = rarity_of_new_rows(est, np.array([[4.0]]), np.array([np.exp(2.0)]), np.array([[0.0, 5.0]]))
    # latent: nearest fitted row at distance 1; embedding at 5: the 2nd nearest fitted row at distance 2 (3 and 7)
    z_new = (np.log(1.0) - np.log(2)) / (1.4826 * np.log(2)) + (np.log(2.0) - np.log(3)) / (1.4826 * np.log(4 / 3))
    np.testing.assert_allclose(new, [z_new], atol=1e-9)
    # the audit stage: knn-recon takes them (three components), other estimators ignore them
    fit = fit_audit_rarity(mu, recon, "knn-recon", n_neighbors=1, embeddings=emb)
    assert set(fit.components) == {"latent", "reconstruction", "embedding"}
    assert fit.fitted.embedding_dims == 2
    assert fit_audit_rarity(mu, recon, "knn", n_neighbors=1, embeddings=emb).fitted.n_features_in_ == 1


def test_gaussian_mixture_with_one_component_is_the_gaussian_log_density():
    from scipy.stats import multivariate_normal

    from debias.density.rarity import (
        audit_features,
        build_rarity_estimator,
        fitted_rarity,
    )

    rng = np.random.default_rng(0)
    mu = rng.normal(size=(400, 2)) @ np.array([[1.0, 0.5], [0.0, 0.8]])
    est = build_rarity_estimator("gmm", n_components=1, reg_covar=0.0)
    fitted_rarity(est, audit_features(mu, np.ones(400)))  # fitted on all rows (the rows are scored cross-fitted)
    gauss = multivariate_normal(mu.mean(0), np.cov(mu.T, bias=True))
    np.testing.assert_allclose(est.score_samples(mu), gauss.logpdf(mu), rtol=1e-6)


def test_rarity_weights_are_tempered_exponentials_at_the_target_ess():
    from debias.density.rarity import rarity_weights

    rarity = np.array([0.0, 0.0, 0.0, 1.0, 3.0])
    w, t = rarity_weights(rarity, 0.6)
    np.testing.assert_allclose(w, np.exp(t * rarity) / np.exp(t * rarity).sum(), atol=1e-9)
    assert effective_sample_size(w) == pytest.approx(0.6 * 5, rel=1e-6)
    assert w[4] > w[3] > w[0]


def test_every_rarity_estimator_ranks_a_planted_outlier_first():
    from debias.density.rarity import (
        RARITY_ESTIMATORS,
        audit_features,
        build_rarity_estimator,
        fitted_rarity,
    )

    rng = np.random.default_rng(1)
    mu = rng.normal(size=(300, 4))
    mu[0] = 8.0  # far from everything in every dimension
    recon = np.exp(rng.normal(size=300) * 0.1)
    recon[0] = np.exp(3.0)  # and badly reconstructed
    for name in RARITY_ESTIMATORS:
        rarity = fitted_rarity(build_rarity_estimator(name), audit_features(mu, recon))
        assert np.argmax(rarity) == 0, name
