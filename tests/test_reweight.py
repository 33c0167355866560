"""Sampling schemes, group metrics and the data helpers of train-classifier, against small hand-computed cases."""

import numpy as np
import pandas as pd
import pytest
import torch

from debias.data.splits import validation_split
from debias.density.estimators import LatentHistogramDensity
from debias.errors import DebiasError
from debias.evaluation.classifier_metrics import auroc, classification_metrics
from debias.models import ConvVAE, VAEConfig
from debias.pipelines.train_classifier import (
    apply_subsample,
    label_values,
    parse_subsample,
)
from debias.training.sampling import (
    DBVAEAdaptive,
    Fixed,
    Uniform,
    audit_weights,
    draw_epoch,
    jtt_upweight_auto,
    jtt_weights,
)


def test_group_metrics_hand_computed():
    table = pd.DataFrame({"race": ["a", "a", "a", "b", "b", "c"], "sex": ["f", "m", "m", "f", "f", "m"]})
    y = np.array([0, 1, 1, 0, 0, 1])
    # predictions: right, right, wrong, wrong, right, right -> accuracy 4/6
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    m = classification_metrics(table, y, probs, ["race", "sex"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    race = m["groupings"]["race"]
    assert {g: r["accuracy"] for g, r in race["groups"].items()} == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    assert race["worst_group"] == "b" and race["worst_group_accuracy"] == pytest.approx(0.5)
    assert race["accuracy_variance"] == pytest.approx(np.var([2 / 3, 0.5, 1.0]))
    cross = m["groupings"]["race x sex"]["groups"]
    assert set(cross) == {"a x f", "a x m", "b x f", "c x m"}
    assert cross["a x m"] == {"n": 2, "accuracy": 0.5}
    # the top level reports the finest grouping (the cross product)
    assert m["worst_group_accuracy"] == pytest.approx(0.5)
    assert m["group_accuracy_variance"] == pytest.approx(np.var([1.0, 0.5, 0.5, 1.0]))
    # AUROC of the second class's probability: positives {.8,.4,.9} vs negatives {.1,.7,.2} -> 8 of 9 pairs
    assert m["auroc"] == pytest.approx(8 / 9)


def test_auroc_multiclass_and_single_class():
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert auroc(y, probs) == pytest.approx(1.0)
    assert auroc(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]])) is None


def test_draw_epoch_uniform_is_a_permutation_and_weighted_follows_weights():
    rng = np.random.default_rng(0)
    assert sorted(draw_epoch(None, 50, rng)) == list(range(50))
    w = np.array([0.0, 0.0, 1.0])
    assert set(draw_epoch(w, 3, rng)) == {2}


def test_jtt_weights_upsample_the_error_set():
    w = jtt_weights(np.array([True, False, False, True]), upweight=5)
    np.testing.assert_allclose(w, np.array([5, 1, 1, 5]) / 12)


def test_jtt_auto_upweight_draws_the_error_set_half_the_time():
    err = np.array([True] * 20 + [False] * 80)
    lam = jtt_upweight_auto(err)
    assert lam == pytest.approx(4.0)
    assert jtt_weights(err, lam)[err].sum() == pytest.approx(0.5)
    assert jtt_upweight_auto(np.zeros(10, dtype=bool)) == 1.0  # no errors: plain ERM
    assert jtt_upweight_auto(np.array([True] + [False] * 999)) == 100.0  # capped


def test_fixed_rejects_bad_weights():
    with pytest.raises(DebiasError):
        Fixed("two-stage", np.array([0.0, 0.0]))
    with pytest.raises(DebiasError):
        Fixed("two-stage", np.array([1.0, np.nan]))


def test_audit_weights_join_on_path(tmp_path):
    scores = pd.DataFrame({"path": ["c", "a", "b", "x"], "weight": [3.0, 1.0, 2.0, 100.0]})
    scores.to_parquet(tmp_path / "scores.parquet")
    w = audit_weights(tmp_path / "scores.parquet", pd.Series(["a", "b", "c"]))
    np.testing.assert_allclose(w, [1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(DebiasError, match="no weight"):
        audit_weights(tmp_path / "scores.parquet", pd.Series(["a", "zz"]))


def test_dbvae_scheme_refits_on_the_models_latents():
    # Under auto the scheme encodes in fp32 on every machine (classifier training stays fp32), so its weights equal a
    # hand fit on fp32 latents; at bf16 the latents would cross histogram bin edges.
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(image_size=32, latent_dim=4, width=4, n_classes=2, classes=["a", "b"]))
    images = torch.rand(60, 3, 32, 32)
    labels = np.repeat([0, 1], [45, 15])
    density = lambda: LatentHistogramDensity(bins=5, target_ess=0.5)  # noqa: E731
    scheme = DBVAEAdaptive(lambda idx: images[torch.as_tensor(idx)], 60, density, warmup_epochs=1)
    w0, info0 = scheme.weights(0, model)
    assert w0 is None and info0["ess"] == 60  # warm-up: uniform
    w1, info1 = scheme.weights(1, model)
    assert w1.sum() == pytest.approx(1.0) and info1["ess"] == pytest.approx(30, rel=0.05)
    # the same weights as fitting the density by hand on the encoder's posterior means
    with torch.no_grad():
        mu = model.eval().encode(images)[0].double().numpy()
    np.testing.assert_allclose(w1, density().fit(mu).sampling_weights(mu), rtol=1e-5)
    # per-class mode keeps each class's share of the draws
    per_class = DBVAEAdaptive(lambda idx: images[torch.as_tensor(idx)], 60, density, labels=labels)
    w, _ = per_class.weights(0, model)
    assert w[labels == 1].sum() == pytest.approx(15 / 60)


def test_uniform_scheme():
    w, info = Uniform(10).weights(0, None)
    assert w is None and info["ess_fraction"] == 1.0


def test_validation_split_is_stratified_seeded_and_disjoint():
    y = np.repeat([0, 1, 2], [50, 30, 2])
    fit, val = validation_split(y, 0.2, seed=3)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(y)
    assert np.bincount(y[val], minlength=3).tolist() == [10, 6, 0]  # round(2 * 0.2) = 0: the tiny class stays in training
    fit2, val2 = validation_split(y, 0.2, seed=3)
    assert np.array_equal(val, val2)
    assert not np.array_equal(val, validation_split(y, 0.2, seed=4)[1])
    assert len(validation_split(y, 0.0, seed=0)[1]) == 0


def test_subsample_keeps_a_seeded_fraction_of_one_value():
    table = pd.DataFrame({"race": ["black"] * 10 + ["white"] * 10})
    rows = np.arange(20)
    kept = apply_subsample(table, rows, ["race=black:0.2"], seed=0)
    assert (table["race"][kept] == "black").sum() == 2 and (table["race"][kept] == "white").sum() == 10
    assert np.array_equal(kept, apply_subsample(table, rows, ["race=black:0.2"], seed=0))
    assert parse_subsample("a=b:c:0.5") == ("a", "b:c", 0.5)
    for bad in ("race=black", "race:0.2", "race=black:2", "=x:0.1"):
        with pytest.raises(DebiasError, match="--subsample"):
            parse_subsample(bad)
    with pytest.raises(DebiasError, match="no training rows"):
        apply_subsample(table, rows, ["race=green:0.5"], seed=0)


def test_label_values_keep_the_columns_own_types():
    assert label_values(pd.Series([3, 1, 3, 10]), ["1", "10", "3"]) == [1, 10, 3]
    assert label_values(pd.Series(["m", "f"]), ["f", "m"]) == ["f", "m"]


# -- issue 12: rarity in a first model's features, its hybrid with the errors, label-free selection ----------------
def test_class_rarity_upweights_the_rare_mode_of_each_class_and_keeps_class_shares():
    from debias.density.estimators import KNNDensity, effective_sample_size
    from debias.training.sampling import ClassRarity

    rng = np.random.default_rng(0)
    # class 0: 190 rows near (0, 0) and 10 near (5, 5); class 1: 95 near (5, 5) and 5 near (0, 0)
    X = np.vstack([rng.normal(0, 0.3, (190, 2)), rng.normal(5, 0.3, (10, 2)),
                   rng.normal(5, 0.3, (95, 2)), rng.normal(0, 0.3, (5, 2))])
    y = np.r_[np.zeros(200), np.ones(100)].astype(int)
    rare = np.r_[np.zeros(190), np.ones(10), np.zeros(95), np.ones(5)].astype(bool)
    est = ClassRarity(lambda n_rows: KNNDensity(n_neighbors=5, n_components=None), target_ess=0.5).fit(X, y)
    w = est.weights_
    assert w.sum() == pytest.approx(1.0)
    assert w[y == 0].sum() == pytest.approx(2 / 3) and w[y == 1].sum() == pytest.approx(1 / 3)  # class shares kept
    for k in (0, 1):
        in_k = y == k
        assert effective_sample_size(w[in_k]) / in_k.sum() == pytest.approx(0.5, abs=1e-3)  # tempered per class
        assert np.median(w[in_k & rare]) > 3 * np.median(w[in_k & ~rare])
    # new rows are scored against their own class: a class-1 row at (0, 0) is rare, a class-0 row there is not
    wn = est.weights(np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]]), np.array([0, 1, 1, 0]))
    assert wn[1] > wn[2] and wn[3] > wn[0]


def test_rarity_bandwidth_grows_with_the_class_so_a_tight_rare_group_reads_as_sparse():
    """Inverse density equalises volume: with k below a group's size, a tight group is its own dense neighbourhood.
    The default k (5 % of the class's rows) exceeds it, and the group's rows get the most weight."""
    from debias.density.estimators import KNNDensity
    from debias.training.sampling import ClassRarity, neighbours_for_class

    assert neighbours_for_class(2000) == 100 and neighbours_for_class(100) == 20 and neighbours_for_class(10) == 9
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1.0, (1920, 2)), rng.normal(4, 0.05, (80, 2))])  # 4 % tight group at (4, 4)
    y = np.zeros(2000, dtype=int)
    rare = np.r_[np.zeros(1920), np.ones(80)].astype(bool)
    small = ClassRarity(lambda n_rows: KNNDensity(n_neighbors=5, n_components=None), target_ess=0.5).fit(X, y).weights_
    scaled = ClassRarity(lambda n_rows: KNNDensity(neighbours_for_class(n_rows), n_components=None), target_ess=0.5).fit(X, y)
    assert small[rare].sum() < rare.mean()  # k = 5: the tight group looks dense and loses draws
    assert scaled.weights_[rare].sum() > 3 * rare.mean()  # k = 100 > 80: its k-th neighbours are far away


def test_selection_accuracy_weights_each_class_by_the_methods_weights():
    from debias.training.classifier import selection_accuracy

    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 0, 0, 1, 1])  # correct: yes, yes, no, yes, no
    assert selection_accuracy(probs, y) == pytest.approx(3 / 5)
    w = np.array([1.0, 1.0, 2.0, 1.0, 3.0])
    # class 0: (1 + 1 + 0) / 4; class 1: (1 + 0) / 4; mean over classes
    assert selection_accuracy(probs, y, w) == pytest.approx((2 / 4 + 1 / 4) / 2)


def test_group_balanced_weights_draw_every_group_equally():
    from debias.pipelines.train_classifier import group_balanced_weights

    t = pd.DataFrame({"a": ["x", "x", "x", "y"], "b": [1, 1, 2, 2]})
    w = group_balanced_weights(t, ["a", "b"])
    assert w == pytest.approx([1 / 6, 1 / 6, 1 / 3, 1 / 3])
    assert group_balanced_weights(t, ["a"]) == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])



def test_cluster_error_weights_hand_computed():
    """One class, two clear clusters: 90 rows the first model got right, 10 it always got wrong. Half the draws go as
    in the data (1/100 per row), half to the clusters by error rate (all of it to the small one): the small cluster
    gets 10 * (0.5/10 + 0.5/100) = 55 % of the draws. Validation rows take their nearest cluster's weight."""
    from debias.training.sampling import ClusterErrorWeights

    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 0.1, (90, 3)), rng.normal(5, 0.1, (10, 3))])
    y = np.zeros(100, dtype=int)
    errors = np.r_[np.zeros(90), np.ones(10)].astype(bool)
    est = ClusterErrorWeights(n_clusters=2, n_components=2).fit(X, y, errors)
    assert est.weights_[90:].sum() == pytest.approx(0.55)
    assert est.weights_[:90] == pytest.approx(np.full(90, 0.45 / 90))
    w_new = est.weights(np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]), np.array([0, 0]))
    assert w_new == pytest.approx([0.005 / 0.06, 0.055 / 0.06])
    # no errors at all: the weights are the data's
    flat = ClusterErrorWeights(n_clusters=2, n_components=2).fit(X, y, np.zeros(100, dtype=bool)).weights_
    assert flat == pytest.approx(np.full(100, 0.01))


def test_mix_within_classes_hand_computed():
    """Class 0 (3 rows, share 0.6): half its draws ∝ scores 1, 1, 2, half even; class 1 (2 rows) all scores 0: even."""
    from debias.training.sampling import mix_within_classes

    w = mix_within_classes(np.array([1.0, 1.0, 2.0, 0.0, 0.0]), np.array([0, 0, 0, 1, 1]), 0.5)
    in_class0 = 0.5 * np.array([0.25, 0.25, 0.5]) + 0.5 / 3
    assert w == pytest.approx(np.r_[0.6 * in_class0, 0.2, 0.2])
    with pytest.raises(DebiasError):
        mix_within_classes(np.ones(2), np.zeros(2), 1.5)


def test_relative_difficulty_favours_rows_the_biased_model_fails_and_the_new_one_learns():
    """LfF's W = L_B / (L_B + L_D), each loss over its class maximum, D's losses a moving average over epochs. Row 0:
    B right, D right; row 1: B wrong, D right (a cue's exception D has learned); row 2: both wrong (a hard row)."""
    from debias.training.sampling import RelativeDifficulty

    y = np.zeros(3, dtype=int)
    bias = np.array([0.1, 2.0, 2.0])
    epochs = iter([np.array([0.7, 0.7, 0.7]), np.array([0.1, 0.1, 2.0])])
    scheme = RelativeDifficulty(bias, lambda model: next(epochs), y, mix=1.0, ema=0.5)
    p0, info0 = scheme.weights(0, None)
    lb = bias / 2.0
    assert p0 == pytest.approx(lb / (lb + 1.0) / (lb / (lb + 1.0)).sum())  # D untrained: its losses all equal
    p1, _ = scheme.weights(1, None)
    ld = np.array([0.4, 0.4, 1.35]) / 1.35  # the moving average 0.5 * 0.7 + 0.5 * now, over its maximum
    expect = lb / (lb + ld)
    assert p1 == pytest.approx(expect / expect.sum())
    assert p1[1] > p1[2] > p1[0]
    assert 0 < info0["ess_fraction"] <= 1


def test_first_epoch_concentration_is_low_when_few_rows_carry_the_loss():
    """A biased model that fits 95 rows of a class (loss 0.01) and fails 5 (loss 3): LfF's first-epoch weights sit on
    the 5, an ESS near the group-balanced one; the same total loss spread over every row gives an ESS near 1."""
    from debias.training.sampling import first_epoch_concentration, mix_within_classes

    y = np.zeros(100, dtype=int)
    concentrated = np.r_[np.full(95, 0.01), np.full(5, 3.0)]
    w = concentrated / 3.0
    p = mix_within_classes(w / (w + 1.0), y, 0.5)
    assert first_epoch_concentration(concentrated, y) == pytest.approx(1 / np.sum(p**2) / 100)
    assert first_epoch_concentration(concentrated, y) < 0.3
    assert first_epoch_concentration(np.full(100, 0.5), y) == pytest.approx(1.0)
