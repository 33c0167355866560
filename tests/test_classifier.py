"""train-classifier end to end on tiny data: every method's outputs, labels in their own values, evaluation groups that
never touch training, model selection on validation rows only, and resume."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from debias.data import BUILTIN_DATASETS
from debias.errors import DebiasError
from debias.models import ConvVAE, VAEConfig
from debias.pipelines.train_classifier import ClassifierJob, run_train_classifier
from debias.runtime.checkpoint import load_checkpoint
from debias.training.classifier import ClassifierTrainConfig, load_classifier

SPURIOUS = "builtin:spurious?n=400"


def tiny_job(out: Path, method: str, **kw) -> ClassifierJob:
    base = dict(
        data=SPURIOUS,
        label="label",
        out=out,
        method=method,
        where=["split=train"],
        eval_where=["split=test"],
        eval_groups=["colour", "label"],
        image_size=32,
        latent_dim=6,
        width=8,
        train=ClassifierTrainConfig(epochs=2, batch_size=64, seed=1, device="cpu"),
        jtt_epochs=1,
        stage1_epochs=1,
        rarity_dims=8,
        progress=False,
        show_table=False,
    )
    base.update(kw)
    return ClassifierJob(**base)


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "classifier.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["none", "dbvae", "jtt", "two-stage"])
def test_every_method_writes_its_outputs(tmp_path, method):
    weights = None
    if method == "two-stage":  # a stand-in audit: every training row, heavier weight on blue shapes
        table = BUILTIN_DATASETS["spurious"].table(n=400)
        scores = table.assign(weight=np.where(table["colour"] == "blue", 3.0, 1.0))
        weights = tmp_path / "scores.parquet"
        scores.to_parquet(weights)
    res = run_train_classifier(tiny_job(tmp_path / "run", method, weights=weights))
    out = res.out
    for name in ("predictions.csv", "metrics.json", "classifier.pt", "checkpoint.pt", "history.csv"):
        assert (out / name).is_file(), name
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 80 and set(pred["split"]) == {"test"}
    assert {"path", "label", "colour", "group", "split", "prediction", "probability"} <= set(pred.columns)
    assert set(pred["prediction"]) <= {"circle", "square"}
    assert pred["probability"].between(0.5, 1.0).all()
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx((pred["prediction"] == pred["label"]).mean())
    assert set(m["groupings"]) == {"colour", "label", "colour x label"}
    assert len(m["groupings"]["colour x label"]["groups"]) == 4
    assert m["worst_group_accuracy"] == min(g["accuracy"] for g in m["groupings"]["colour x label"]["groups"].values())
    assert len(m["effective_sample_size_per_epoch"]) == len(m["epoch_s"]) == 2
    ess = np.asarray(m["effective_sample_size_per_epoch"])
    assert ((ess > 0) & (ess <= m["n_train"] + 1e-6)).all()
    if method == "none":
        assert (ess == m["n_train"]).all()
    else:
        assert (ess < m["n_train"]).all()
    # the classifier file loads on its own and reproduces the predictions' probabilities' shape
    model, meta = load_classifier(out)
    assert meta["meta"]["classes"] == ["circle", "square"] and model.config.n_classes == 2
    if method == "jtt":
        assert (out / "jtt_stage1" / "classifier.pt").is_file()
        assert 0 <= m["jtt"]["error_set_size"] <= m["n_train"]


def test_validation_rows_come_from_training_rows_and_select_the_epoch(tmp_path):
    m = run_train_classifier(tiny_job(tmp_path / "run", "none", train=replace(tiny_job(tmp_path, "none").train, epochs=3))).metrics
    assert m["n_train"] + m["n_val"] == 320 and m["n_val"] == 32  # 10 % of the 320 training rows; the test rows: 80
    val = [h["val_accuracy"] for h in m["history"]]
    assert m["selected_epoch"] == int(np.argmax(val)) + 1  # first epoch with the best validation accuracy
    assert m["validation_accuracy"] == max(val)


def _write_manifest(folder: Path, n: int = 200) -> pd.DataFrame:
    images, table = BUILTIN_DATASETS["spurious"](image_size=32, n=n)
    (folder / "img").mkdir(parents=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(f"img/{i:04d}.png")
        Image.fromarray(img).save(folder / paths[-1])
    return table.assign(path=paths)


def test_eval_groups_never_reach_training(tmp_path):
    """Permuting the group columns changes the per-group results but leaves the trained weights bit for bit equal."""
    table = _write_manifest(tmp_path)
    table.to_csv(tmp_path / "a.csv", index=False)
    perm = np.random.default_rng(0).permutation(len(table))
    shuffled = table.assign(colour=table["colour"].to_numpy()[perm], group=table["group"].to_numpy()[perm])
    shuffled.to_csv(tmp_path / "b.csv", index=False)
    train = ClassifierTrainConfig(epochs=1, batch_size=64, seed=2, device="cpu")
    kw = dict(eval_groups=["colour", "group"], where=["split=train"], eval_where=["split=test"], train=train)
    # the adaptive weights, JTT's error set and the first model's clusters and errors all come from the model alone
    for method in ("dbvae", "jtt", "auto", "cluster-errors", "rarity", "lff"):
        a = run_train_classifier(tiny_job(tmp_path / f"{method}_a", method, data=str(tmp_path / "a.csv"), **kw))
        b = run_train_classifier(tiny_job(tmp_path / f"{method}_b", method, data=str(tmp_path / "b.csv"), **kw))
        assert_same_weights(weights_of(a.out), weights_of(b.out))
        assert a.predictions["prediction"].tolist() == b.predictions["prediction"].tolist()
        assert a.metrics["groupings"]["colour"] != b.metrics["groupings"]["colour"]  # the groups did change


def test_integer_multiclass_labels_are_predicted_in_their_own_values(tmp_path):
    table = BUILTIN_DATASETS["shapes"].table(n=300)
    res = run_train_classifier(
        tiny_job(tmp_path / "run", "dbvae", data="builtin:shapes?n=300", label="rare", eval_groups=["shape"],
                 train=ClassifierTrainConfig(epochs=1, batch_size=64, device="cpu"))
    )
    pred = pd.read_csv(res.out / "predictions.csv")
    assert pred["prediction"].dtype.kind == "i" and set(pred["prediction"]) <= {0, 1}
    assert res.metrics["classes"] == [0, 1]
    assert res.metrics["precision"] == "fp32"  # classifier training at auto: fp32 on every machine (device.py)
    multi = run_train_classifier(
        tiny_job(tmp_path / "multi", "none", data="builtin:shapes?n=300", label="shape", eval_groups=["colour"],
                 train=ClassifierTrainConfig(epochs=1, batch_size=64, device="cpu"))
    )
    assert set(multi.predictions["prediction"]) <= set(table["shape"])
    assert multi.metrics["auroc"] is not None and len(multi.metrics["classes"]) == 3


def test_resume_continues_to_the_same_weights(tmp_path):
    """A dbvae run stopped after one epoch and resumed to two equals an uninterrupted two-epoch run."""
    one = tiny_job(tmp_path / "resumed", "dbvae", train=ClassifierTrainConfig(epochs=1, batch_size=64, seed=1, device="cpu"))
    run_train_classifier(one)
    run_train_classifier(replace(one, train=replace(one.train, epochs=2), resume=True))
    run_train_classifier(tiny_job(tmp_path / "fresh", "dbvae"))
    a = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "fresh" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert_same_weights(a["model"], b["model"])
    assert [h["ess"] for h in a["history"]] == pytest.approx([h["ess"] for h in b["history"]])


def test_refusals(tmp_path):
    with pytest.raises(DebiasError, match="--weights"):
        run_train_classifier(tiny_job(tmp_path / "r", "two-stage"))
    with pytest.raises(DebiasError, match="--reweight"):
        run_train_classifier(tiny_job(tmp_path / "r", "bogus"))
    with pytest.raises(DebiasError, match="--eval-where/--eval-groups"):
        run_train_classifier(tiny_job(tmp_path / "r", "none", eval_groups=["nosuch"]))
    with pytest.raises(DebiasError, match="--label"):
        run_train_classifier(tiny_job(tmp_path / "r", "none", label="nosuch"))


def test_dbvae_loss_weights_the_vae_term():
    """L = CE + w * (recon + beta * KL): w = 1 is vae_loss itself, w = 0 the classifier's cross-entropy alone."""
    import torch.nn.functional as F

    from debias.models import ConvVAE, VAEConfig, vae_loss
    from debias.training.classifier import dbvae_loss

    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(image_size=32, latent_dim=4, width=4, n_classes=3, classes=["a", "b", "c"])).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # eval mode: z = mu, deterministic
    joint = vae_loss(model, x, y)[0]
    ce = F.cross_entropy(model.encode(x)[2], y)
    assert dbvae_loss(model, x, y, 1.0)[0].item() == pytest.approx(joint.item())
    assert dbvae_loss(model, x, y, 0.0)[0].item() == pytest.approx(ce.item(), rel=1e-5)
    w = 0.01
    assert dbvae_loss(model, x, y, w)[0].item() == pytest.approx(ce.item() + w * (joint - ce).item(), rel=1e-5)


@pytest.mark.parametrize("method", ["cluster-errors", "rarity", "lff"])
def test_first_model_methods_run_end_to_end_with_weighted_selection(tmp_path, method):
    """The default method, the density-only one and LfF on a tiny set: a first model, weights that favour the
    off-colour rows, the epoch chosen by the weighted validation accuracy, and the report with what the debiaser did."""
    gate = {"auto_gate": 1.0} if method == "rarity" else {}  # its shortcut gate open: the density path itself
    res = run_train_classifier(tiny_job(tmp_path / method, method, **gate, train=ClassifierTrainConfig(
        epochs=2, batch_size=64, seed=1, device="cpu")))
    m = res.metrics
    assert (tmp_path / method / "stage1" / "classifier.pt").is_file()
    assert m["config"]["method_options"]["weighted_selection"] is True
    assert m["config"]["method_options"]["stage1_loss"] == ("gce" if method in ("lff", "rarity") else "ce")
    # LfF's and rarity's biased model sees 5 px at a time (it can learn the colour, not the shape); cluster-errors'
    # plain first model sees the image
    encoder = "local" if method in ("lff", "rarity") else "conv"
    assert m["config"]["method_options"]["stage1_encoder"] == encoder
    assert load_classifier(tmp_path / method / "stage1")[0].config.encoder == encoder
    if method == "rarity":  # features on quantiles of all training rows (the default), recorded with the run
        assert m["config"]["method_options"]["rarity_quantiles"] is True
    if method == "rarity":  # the k each class's density used is recorded (the default scales with the class)
        ks = m["first_model"]["rarity_k"]  # by class index, as in `classes`
        assert set(ks) == {str(i) for i in range(len(m["classes"]))} and min(ks.values()) >= 1
    val = [h["val_accuracy"] for h in m["history"]]
    assert m["selected_epoch"] == int(np.argmax(val)) + 1
    assert all(h["ess_fraction"] < 1.0 for h in m["history"])  # the draws are weighted, not uniform
    shares = {r["group"]: r for r in m["weight_shares"]["colour x label"]}
    assert sum(r["draw_share"] for r in shares.values()) == pytest.approx(1.0)
    assert set(shares) == {"red x circle", "blue x circle", "red x square", "blue x square"}
    html = (res.out / "report.html").read_text()
    for fragment in ("Accuracy per group", "Draws per group against the data", "Sampling weights over epochs",
                     "Most upweighted training images", "label = circle", "label = square"):
        assert fragment in html, fragment
    assert html.count('<img class="px"') == 64  # 32 most upweighted images per class
    assert "<script" not in html


@pytest.mark.parametrize(("gate", "chosen"), [(1.0, "lff"), (1e-6, "none")])
def test_auto_trains_as_lff_below_the_gate_and_plainly_above(tmp_path, gate, chosen):
    """The default reads how concentrated the biased first model's losses are (the ESS of LfF's first-epoch weights)
    and trains the second model either way: LfF's weights change from epoch to epoch; without a shortcut the second
    model is plain training, the very run `none` makes (same seed, same draws, same weights)."""
    cfg = ClassifierTrainConfig(epochs=2, batch_size=64, seed=1, device="cpu")
    res = run_train_classifier(tiny_job(tmp_path / "run", "auto", auto_gate=gate, stage1_max_epochs=3, train=cfg))
    first = res.metrics["first_model"]
    assert first["chose"] == chosen and first["gate"] == gate and 0 < first["first_epoch_ess"] <= 1
    # a first model whose losses are not concentrated gets more epochs, one at a time, up to stage1_max_epochs
    assert first["epochs"] == len(first["epoch_s"]) == (1 if chosen == "lff" else 3)
    assert len(load_classifier(res.out / "stage1")[1]["history"]) == first["epochs"]
    ess = [h["ess_fraction"] for h in res.metrics["history"]]
    if chosen == "lff":
        assert all(e < 1.0 for e in ess) and ess[0] != ess[1]
    else:
        assert ess == [1.0, 1.0]
        plain = run_train_classifier(tiny_job(tmp_path / "none", "none", train=cfg))
        for a, b in zip(load_classifier(res.out)[0].state_dict().values(),
                        load_classifier(plain.out)[0].state_dict().values()):
            assert torch.equal(a, b)
    assert f"auto chose {chosen}:" in (res.out / "report.html").read_text()


def test_the_local_encoder_sees_five_pixels_and_pools_over_the_image():
    """The first model of auto and lff: a pixel changes the 3x3-then-3x3 feature map only within 2 px of it, the
    features are each channel's mean and max over the image, and a config without the field loads as the full
    convolutional encoder (checkpoints written before it existed)."""
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(image_size=32, latent_dim=4, width=8, n_classes=2, encoder="local")).eval()
    x = torch.rand(1, 3, 32, 32)
    x2 = x.clone()
    x2[0, :, 16, 16] += 1.0
    maps = model.encoder[:-1]  # before the pooling: (1, 16, 16, 16), the second convolution has stride 2
    changed = (maps(x2) - maps(x)).abs().sum((0, 1)) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert changed.any() and rows.min() >= 7 and rows.max() <= 9 and cols.min() >= 7 and cols.max() <= 9
    assert model.features(x).shape == (1, 2 * 16)
    h = maps(x)
    assert torch.equal(model.features(x), torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))
    assert model.encode(x)[2].shape == (1, 2)
    assert VAEConfig(**{k: v for k, v in VAEConfig().to_dict().items() if k != "encoder"}).encoder == "conv"
    with pytest.raises(ValueError, match="encoder must be one of conv, local"):
        VAEConfig(encoder="bagnet")


def test_report_escapes_values_from_the_data(tmp_path):
    """A label value with markup in it is shown as text in report.html (Jinja2 autoescape)."""
    table = _write_manifest(tmp_path, n=120)
    table["label"] = np.where(table["label"] == "circle", "<b>circle</b>", "square")
    table.to_csv(tmp_path / "m.csv", index=False)
    res = run_train_classifier(tiny_job(tmp_path / "run", "none", data=str(tmp_path / "m.csv"),
                                        eval_where=[], eval_groups=["colour"],
                                        train=ClassifierTrainConfig(epochs=1, batch_size=64, device="cpu")))
    html = (res.out / "report.html").read_text()
    assert "&lt;b&gt;circle&lt;/b&gt;" in html and "<b>circle</b>" not in html


def test_oracle_is_a_reference_that_needs_its_groups(tmp_path):
    with pytest.raises(DebiasError, match="oracle"):
        run_train_classifier(tiny_job(tmp_path / "o", "oracle"))
    with pytest.raises(DebiasError, match="only it reads them"):
        run_train_classifier(tiny_job(tmp_path / "o", "none", oracle_groups=["colour"]))
    res = run_train_classifier(tiny_job(tmp_path / "o2", "oracle", oracle_groups=["colour", "label"]))
    shares = {r["group"]: r["draw_share"] for r in res.metrics["weight_shares"]["colour x label"]}
    assert list(shares.values()) == pytest.approx([0.25] * 4)  # every group drawn equally often


def test_rarity_quantiles_are_fitted_on_all_training_rows():
    """rarity's feature map: each feature becomes its quantile among all training rows (both classes), so a value
    common in the whole set but rare in one class keeps a wide range there; validation rows go through the same map."""
    from debias.pipelines.train_classifier import _to_quantiles

    rng = np.random.default_rng(0)
    feats = np.c_[rng.exponential(1.0, 2000), rng.normal(0, 5, 2000)]
    q, q_val = _to_quantiles(feats, feats[:10] + 0.0)
    assert q.min() >= 0 and q.max() <= 1 and np.allclose(np.sort(q[:, 0])[[200, 1000, 1800]], [0.1, 0.5, 0.9], atol=0.01)
    assert np.allclose(q_val, q[:10])  # the fitted map, not a new one
    assert np.array_equal(np.argsort(q[:, 1], kind="stable"), np.argsort(feats[:, 1], kind="stable"))  # monotone
    assert _to_quantiles(feats, feats[:0])[1].shape == (0, 2)


def test_rarity_trains_plainly_when_its_first_model_finds_no_shortcut(tmp_path):
    """rarity uses auto's gate as a switch: a first model whose losses do not concentrate (here a gate no model can
    pass) means no reweighting at all, the very run `none` makes; the weights themselves stay the density's alone."""
    cfg = ClassifierTrainConfig(epochs=1, batch_size=64, seed=1, device="cpu")
    res = run_train_classifier(tiny_job(tmp_path / "run", "rarity", auto_gate=1e-6, stage1_max_epochs=2, train=cfg))
    first = res.metrics["first_model"]
    assert first["chose"] == "none" and first["epochs"] == 2 and "rarity_k" not in first
    assert [h["ess_fraction"] for h in res.metrics["history"]] == [1.0]
    assert res.metrics["config"]["method_options"]["auto_gate"] == 1e-6
    plain = run_train_classifier(tiny_job(tmp_path / "none", "none", train=cfg))
    for a, b in zip(load_classifier(res.out)[0].state_dict().values(), load_classifier(plain.out)[0].state_dict().values()):
        assert torch.equal(a, b)
