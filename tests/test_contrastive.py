"""The contrastive encoder (the novelty score's second view, issue 16): the model, its views and loss, its training
loop (files, resume, refusals), `debias train` with and without it, and the detector that reads its features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from debias.data import load_images
from debias.density.detector import NOVELTY_FILE, encoder_features, open_detector
from debias.density.novelty import DEFAULT_EMBEDDING_READOUT, NoveltyScorer
from debias.errors import DebiasError
from debias.models.contrastive import (
    ContrastiveConfig,
    ContrastiveEncoder,
    contrastive_loss,
    nt_xent,
    random_views,
    supervised_contrastive,
)
from debias.pipelines.cli import app as cli_app
from debias.runtime.checkpoint import load_checkpoint
from debias.training.contrastive import (
    ContrastiveTrainConfig,
    encoder_path,
    learning_rate,
    load_encoder,
    train_contrastive,
)
from tests.novelty_support import TINY_SOURCE, tiny_run


def test_encoder_gives_unit_features_and_computes_at_its_input_size():
    cfg = ContrastiveConfig(image_size=64, channels=3, width=4)
    model = ContrastiveEncoder(cfg).eval()
    assert cfg.input_size == 32 and cfg.feature_dim() == 16 and cfg.feature_dim("maps-max") == 52
    seen = []
    model.body[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        z = model(torch.rand(5, 3, 64, 64))
    assert seen == [(5, 3, 32, 32)]  # resized to max_input before the first convolution
    assert z.shape == (5, 16)
    np.testing.assert_allclose(z.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_readouts_take_the_mean_the_maximum_or_both_of_the_last_map():
    model = ContrastiveEncoder(ContrastiveConfig(image_size=8, channels=1, width=1)).eval()
    # A hand-made last map (B=1, 4 channels, 2x2) in place of the convolutions' output
    fmap = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 4.0]],
                          [[0.0, 0.0], [0.0, 0.0]]]])
    model.body = torch.nn.Sequential(torch.nn.Identity())
    model.resize = lambda x: fmap  # noqa: E731
    mean, peak = torch.tensor([1.0, 2.0, 1.0, 0.0]), torch.tensor([3.0, 2.0, 4.0, 0.0])
    expect = {"avg": mean / mean.norm(), "max": peak / peak.norm(),
              "avg+max": torch.cat([mean / mean.norm(), peak / peak.norm()]) / 2**0.5}
    for readout, want in expect.items():
        got = model(torch.zeros(1, 1, 8, 8), readout)[0]
        assert got.shape == (model.config.feature_dim(readout),)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="readout"):
        model(torch.zeros(1, 1, 8, 8), "sum")
    # the loss reads the spatial mean whatever the readout
    torch.testing.assert_close(model.features(fmap)[0], mean)


def test_map_readouts_pool_every_block_and_weigh_them_alike():
    model = ContrastiveEncoder(ContrastiveConfig(image_size=8, channels=1, width=1)).eval()
    # Two hand-made blocks in place of the five: block 1 gives a 2-channel map, block 2 a 1-channel map
    first = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]], [[0.0, 4.0], [0.0, 0.0]]]])
    second = torch.tensor([[[[2.0, 6.0], [0.0, 0.0]]]])
    model.body = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU())
    model.body[0].forward = lambda x: first  # noqa: E731
    model.body[1].forward = lambda x: second  # noqa: E731
    got = model(torch.zeros(1, 1, 8, 8), "maps-max")[0]
    # maxima (3, 4) -> (0.6, 0.8); (6) -> (1); concatenated / sqrt 2
    torch.testing.assert_close(got, torch.tensor([0.6, 0.8, 1.0]) / 2**0.5)
    got = model(torch.zeros(1, 1, 8, 8), "maps-avg")[0]
    # means (1, 1) -> (1, 1) / sqrt 2; (2) -> (1)
    torch.testing.assert_close(got, torch.tensor([0.5**0.5, 0.5**0.5, 1.0]) / 2**0.5)


@pytest.mark.parametrize("bad", [{"channels": 2}, {"width": 0}, {"min_crop_area": 0.0}, {"jitter": 1.0},
                                 {"temperature": 0.0}, {"image_size": 4}])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        ContrastiveConfig(**bad)


def test_views_are_random_crops_in_range_and_reproducible():
    cfg = ContrastiveConfig(image_size=28, channels=1)
    x = torch.rand(8, 1, 28, 28)
    a = random_views(x, cfg, torch.Generator().manual_seed(1))
    b = random_views(x, cfg, torch.Generator().manual_seed(1))
    c = random_views(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == (8, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a crop stays inside the image: a uniform image gives uniform views (no padding comes in), without jitter
    plain = ContrastiveConfig(image_size=28, channels=1, jitter=0.0)
    v = random_views(torch.full((8, 1, 28, 28), 0.5), plain, torch.Generator().manual_seed(3))
    torch.testing.assert_close(v, torch.full_like(v, 0.5))
    # a 64-px image is viewed at the encoder's 32 px
    assert random_views(torch.rand(2, 3, 64, 64), ContrastiveConfig(image_size=64)).shape == (2, 3, 32, 32)


def test_nt_xent_by_hand_and_its_extremes():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    tau = 0.5
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    expected = []
    for i, j in ((0, 2), (1, 3), (2, 0), (3, 1)):
        others = [k for k in range(4) if k != i]
        expected.append(-(sim[i, j] - torch.logsumexp(sim[i, others], 0)))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    # matching partners score lower than swapped ones
    assert nt_xent(z1, z1, 0.2) < nt_xent(z1, z1.flip(0), 0.2)


def test_supervised_contrastive_by_hand_and_nt_xent_when_every_image_is_its_own_class():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    tau = 0.3
    # one class per image: exactly SimCLR's loss
    assert supervised_contrastive(z1, z2, torch.arange(4), tau).item() == pytest.approx(nt_xent(z1, z2, tau).item(), rel=1e-6)
    # two classes: each view's loss is the mean over its partners (its own pair and the other class members' views)
    y = torch.tensor([0, 0, 1, 1])
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim, labels = z @ z.T / tau, torch.cat([y, y])
    expected = []
    for i in range(8):
        others = [k for k in range(8) if k != i]
        partners = [k for k in others if labels[k] == labels[i]]
        log_p = sim[i] - torch.logsumexp(sim[i, others], 0)
        expected.append(-log_p[partners].mean())
    assert supervised_contrastive(z1, z2, y, tau).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    # features that gather each class score lower than features that mix them
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    gathered, mixed = torch.cat([a, a, b, b]), torch.cat([a, b, a, b])
    assert supervised_contrastive(gathered, gathered, y, 0.2) < supervised_contrastive(mixed, mixed, y, 0.2)


def test_training_with_labels_gathers_the_classes(tmp_path):
    data = _data(96)
    labels = data.table["shape"].astype("category").cat.codes.to_numpy()
    cfg = ContrastiveConfig(image_size=32, channels=3, width=4)
    train = ContrastiveTrainConfig(epochs=6, batch_size=32, min_steps=0, device="cpu")
    paths = {name: train_contrastive(data, cfg, train, tmp_path / name, data_desc={"labels": name}, labels=y,
                                     progress=False) for name, y in (("supcon", labels), ("simclr", None))}

    def same_class_share(path):  # of each image's nearest other image in the features
        model, _ = load_encoder(path)
        with torch.no_grad():
            f = model(data.batch(slice(0, len(data))))
        sim = f @ f.T
        sim.fill_diagonal_(-2)
        return float((labels[sim.argmax(1).numpy()] == labels).mean())

    assert same_class_share(paths["supcon"]) > same_class_share(paths["simclr"])


def test_the_rotation_task_adds_its_cross_entropy_and_names_each_turn():
    torch.manual_seed(0)
    plain = ContrastiveEncoder(ContrastiveConfig(image_size=8, channels=1, width=2))
    assert plain.rotation_head is None and "rotation_head.weight" not in plain.state_dict()  # old files load as before
    with pytest.raises(ValueError, match="rotation"):
        plain.rotation_surprise(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="rotation_weight"):
        ContrastiveConfig(rotation_weight=-1.0)
    model = ContrastiveEncoder(ContrastiveConfig(image_size=8, channels=1, width=2, rotation_weight=0.5))
    loss, parts = contrastive_loss(model, torch.rand(6, 1, 8, 8))
    assert loss.item() == pytest.approx(parts["nt_xent"] + 0.5 * parts["rotation"], rel=1e-5)
    # the surprise is the mean over the four turns of -log p(turn k | image turned by k): by hand from the head
    model.eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = torch.stack([-torch.log_softmax(model.rotation_head(model.features(torch.rot90(x, k, (2, 3)))), 1)[:, k]
                            for k in range(4)]).mean(0)
        torch.testing.assert_close(model.rotation_surprise(x), want)


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [learning_rate(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


def _data(n: int = 64):
    return load_images(f"builtin:shapes?n={n}", image_size=32, progress=False)


def test_training_writes_the_encoder_and_resumes_to_the_same_weights(tmp_path):
    data = _data()
    cfg = ContrastiveConfig(image_size=32, channels=3, width=4)
    desc = {"fingerprint": data.fingerprint}
    whole = train_contrastive(data, cfg, ContrastiveTrainConfig(epochs=2, batch_size=32, min_steps=0, device="cpu"), tmp_path / "a",
                              data_desc=desc, progress=False)
    # one epoch, then resume for the second: the same draws, the same weights
    train_contrastive(data, cfg, ContrastiveTrainConfig(epochs=1, batch_size=32, min_steps=0, device="cpu"), tmp_path / "b",
                      data_desc=desc, progress=False)
    resumed = train_contrastive(data, cfg, ContrastiveTrainConfig(epochs=2, batch_size=32, min_steps=0, device="cpu"),
                                tmp_path / "b", data_desc=desc, resume=True, progress=False)
    a, meta = load_encoder(whole)
    b, _ = load_encoder(resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    assert (tmp_path / "a" / "loss.csv").read_text().count("\n") == 3
    with pytest.raises(DebiasError, match="already holds a training run"):
        train_contrastive(data, cfg, ContrastiveTrainConfig(epochs=2, batch_size=32, min_steps=0, device="cpu"), tmp_path / "a",
                          data_desc=desc, progress=False)
    with pytest.raises(DebiasError, match="other data"):
        train_contrastive(_data(80), cfg, ContrastiveTrainConfig(epochs=3, batch_size=32, min_steps=0, device="cpu"),
                          tmp_path / "a", data_desc={"fingerprint": "other"}, resume=True, progress=False)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    data = _data(128)
    model = ContrastiveEncoder(ContrastiveConfig(image_size=32, channels=3, width=8))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    x = data.batch(slice(0, 128))
    losses = []
    for _ in range(25):
        loss, _ = contrastive_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_load_encoder_refuses_what_is_not_an_encoder(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save({"model": {}, "model_config": {"width": "x"}}, path)
    with pytest.raises(DebiasError, match="not a debias contrastive encoder"):
        load_encoder(path)
    torch.save({"model": {"w": torch.zeros(1)}, "model_config": {"image_size": 32, "channels": 1}}, path)
    with pytest.raises(DebiasError, match="not a debias contrastive encoder"):
        load_encoder(path)
    with pytest.raises(DebiasError, match="no contrastive encoder"):
        load_encoder(tmp_path / "missing")


def test_train_command_trains_the_encoder_on_the_vae_rows_or_none(tmp_path):
    runner = CliRunner()
    common = ["train", "--data", "builtin:shapes?n=120", "--epochs", "1", "--image-size", "32", "--latent-dim", "4",
              "--width", "8", "--device", "cpu", "-q"]
    # 1 epoch of 96 rows is 1 step (batch 256); --contrastive-min-steps 3 makes it 3 epochs
    res = runner.invoke(cli_app, [*common, "--out", str(tmp_path / "with"), "--contrastive-epochs", "1",
                                  "--contrastive-min-steps", "3"])
    assert res.exit_code == 0, res.output
    _, meta = load_encoder(encoder_path(tmp_path / "with"))
    assert [row["epoch"] for row in meta["history"]] == [1, 2, 3]
    # the VAE's rows: the same data description, 120 - 24 = the 80 % the VAE trained on (calibration rows unseen)
    assert meta["data"] == load_checkpoint(tmp_path / "with" / "model.pt")["data"]
    assert meta["data"]["n_images"] - meta["data"]["n_calibration"] == 96
    res = runner.invoke(cli_app, [*common, "--out", str(tmp_path / "without"), "--contrastive-epochs", "0"])
    assert res.exit_code == 0, res.output
    assert not encoder_path(tmp_path / "without").exists()
    det = open_detector(tmp_path / "without", progress=False)
    assert det.encoder is None and "embedding_knn" not in det.scorer.statistics


def test_train_command_trains_the_encoder_with_the_label_only_when_asked(tmp_path):
    runner = CliRunner()
    common = ["train", "--data", "builtin:shapes?n=80", "--epochs", "1", "--image-size", "32", "--latent-dim", "4",
              "--width", "8", "--device", "cpu", "-q", "--contrastive-epochs", "1", "--contrastive-min-steps", "0",
              "--contrastive-labels"]
    res = runner.invoke(cli_app, [*common, "--out", str(tmp_path / "no-label")])
    assert res.exit_code != 0 and "--contrastive-labels needs --label" in str(res.exception)
    res = runner.invoke(cli_app, [*common, "--out", str(tmp_path / "run"), "--label", "shape"])
    assert res.exit_code == 0, res.output
    _, meta = load_encoder(encoder_path(tmp_path / "run"))
    assert meta["data"]["label"] == "shape"  # a resume with another label is refused as other data


def test_detector_reads_the_encoder_and_refits_when_it_changes(tmp_path):
    run = tiny_run(tmp_path / "run")
    det = open_detector(run, progress=False)
    assert det.scorer.statistics[-1] == "embedding_knn" and det.encoder is not None
    assert det.card["novelty"]["embedding"]["features"] == det.encoder.config.feature_dim(det.embedding_readout)
    data = load_images(TINY_SOURCE, image_size=32, progress=False)
    x = data.batch(slice(0, 6))
    res = det.score_batch(x)
    assert {"embedding_knn"} <= set(res.statistics[0])
    # read out at the novelty default (the map's per-channel maximum), recorded in the card and the file
    assert det.embedding_readout == DEFAULT_EMBEDDING_READOUT == det.card["novelty"]["embedding"]["readout"] == "max"
    assert torch.load(run / NOVELTY_FILE, weights_only=True)["embedding_readout"] == "max"
    # the encoder's features enter the score: other features, another score
    X_emb = encoder_features(det.encoder, x, "max")
    assert not np.allclose(X_emb, encoder_features(det.encoder, x))  # the encoder's own readout (the mean) differs
    X = _features(det, x)
    np.testing.assert_allclose(det.scorer.novelty(X, embeddings=X_emb), res.novelty, rtol=1e-9)
    shifted = det.scorer.novelty(X, embeddings=np.roll(X_emb, 1, axis=0))
    assert not np.allclose(shifted, res.novelty)
    # a changed encoder file makes novelty.pt stale: refitted, not read
    stored = torch.load(run / NOVELTY_FILE, weights_only=True)["encoder_sha256"]
    blob = torch.load(encoder_path(run), weights_only=True)
    blob["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in blob["model"].items()}
    torch.save(blob, encoder_path(run))
    again = open_detector(run, progress=False)
    assert torch.load(run / NOVELTY_FILE, weights_only=True)["encoder_sha256"] != stored
    assert not np.allclose(again.score_batch(x).novelty, res.novelty)


def test_a_detector_file_from_before_the_readout_keeps_reading_the_mean(tmp_path):
    run = tiny_run(tmp_path / "run")
    det = open_detector(run, progress=False, embedding_readout="avg")
    blob = torch.load(run / NOVELTY_FILE, weights_only=True)
    del blob["embedding_readout"]  # as the files of session 14 were written
    torch.save(blob, run / NOVELTY_FILE)
    old = open_detector(run, progress=False)
    assert old.embedding_readout == "avg"  # read, not refitted with other features than its references
    x = load_images(TINY_SOURCE, image_size=32, progress=False).batch(slice(0, 4))
    np.testing.assert_allclose(old.score_batch(x).novelty, det.score_batch(x).novelty, rtol=1e-9)


def _features(det, x):
    from debias.density.encoding import encode_batch
    from debias.density.novelty import feature_matrix

    enc, _ = encode_batch(det.model, x)
    return feature_matrix(enc, det.pixel_scores(x))


def test_embedding_knn_leaves_each_fitted_row_out_and_needs_its_embeddings():
    rng = np.random.default_rng(0)
    X = np.hstack([rng.normal(size=(40, 4)), np.full((40, 4), -2.0), np.full((40, 1), 0.01)])
    E = rng.normal(size=(40, 3))
    scorer = NoveltyScorer(statistics=("embedding_knn",), n_neighbors=2).fit(X, embeddings=E)
    fitted = np.sort(scorer.stat_sorted_[0])
    d = np.linalg.norm(E[:, None] - E[None], axis=2)
    np.fill_diagonal(d, np.inf)
    by_hand = np.log(np.sort(d, axis=1)[:, :2].mean(1) + 1e-12)
    np.testing.assert_allclose(fitted, np.sort(by_hand), rtol=1e-5)  # references are stored as float32
    # a new row far from every embedding is more novel than a fitted one
    far = scorer.novelty(X[:2], embeddings=E[:2] + 10)
    assert (far > scorer.novelty(X[:2], embeddings=E[:2])).all()
    with pytest.raises(ValueError, match="needs the images' embeddings"):
        scorer.novelty(X[:2])
    with pytest.raises(ValueError, match="expected embeddings of 3 values"):
        scorer.novelty(X[:2], embeddings=E[:2, :2])
    with pytest.raises(ValueError, match="one row per image"):
        scorer.novelty(X[:2], embeddings=E[:3])


def test_small_sets_get_more_epochs_up_to_the_minimum_steps():
    from debias.training.contrastive import encoder_epochs

    config = ContrastiveTrainConfig(epochs=15, batch_size=256, min_steps=600)
    assert encoder_epochs(config, 54_000) == 15  # 210 steps an epoch: 15 epochs are 3,150 steps already
    assert encoder_epochs(config, 2_000) == 86  # 7 steps an epoch (the last partial batch joins the one before)
    assert encoder_epochs(config, 100) == 600  # fewer rows than a batch: one step an epoch
    assert encoder_epochs(ContrastiveTrainConfig(epochs=15, min_steps=0), 2_000) == 15
    assert encoder_epochs(ContrastiveTrainConfig(epochs=0), 2_000) == 0  # 0 = no encoder, whatever the minimum
