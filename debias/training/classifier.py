"""The classifier training loop shared by every ``--reweight`` method, resumable after a crash.

One architecture for all methods, so that a comparison measures the sampling and nothing else: the ConvVAE encoder
and its linear head (:class:`debias.models.ConvVAE` with ``n_classes`` > 0). What differs per method:

- the objective: ``"ce"`` trains the head's class logits with cross-entropy (the decoder is carried along unused, so
  every method's checkpoint loads the same way); ``"dbvae"`` is the DB-VAE's joint loss, Eq. 5 of Amini et al.
  (:func:`debias.models.vae_loss`), and the classifier is the DB-VAE's own head;
- the sampling scheme (:mod:`debias.training.sampling`), asked once at the start of every epoch.

Model selection uses only the validation rows the caller carved out of the training rows: the epoch with the highest
validation accuracy is kept (``select="best"``), or the last one.

RUN_DIR layout:
    checkpoint.pt   model + optimizer + epoch + configs + history + the best epoch's weights (rewritten atomically
                    after every epoch; ``resume=True`` continues from it)
    classifier.pt   the selected model: weights, model config, label classes and values, history
    history.csv     one row per epoch: loss, train/validation accuracy, effective sample size, timings

Under ``torchrun --nproc-per-node N`` the loop runs data-parallel (DDP, :mod:`debias.runtime.distributed`). The epoch's
sampling weights (for DB-VAE: re-encoding the training rows and refitting the histograms) are computed by rank 0
alone and broadcast, so every rank draws the very same global epoch (the draw is seeded alike everywhere) and trains
on its slice of it; recomputing them on every rank would cost the same wall time but leave the ranks' draws agreeing
only as long as their floating-point results are bit-identical. Validation accuracy (model selection) is likewise
rank 0's, broadcast. ``batch_size`` stays the global batch; rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from debias.data.tensors import ImageTensor
from debias.errors import DebiasError
from debias.models import ConvVAE, VAEConfig, vae_loss
from debias.runtime.checkpoint import load_checkpoint, save_checkpoint
from debias.runtime.device import CLASSIFIER_BF16_WHEN_AUTO, autocast
from debias.runtime.distributed import (
    DistContext,
    ModelWithLoss,
    broadcast_object,
    init_distributed,
    per_rank_batch,
    wrap,
)
from debias.runtime.progress import epoch_line, progress_bar
from debias.training.run_dir import EpochMeter, open_run, optimizer_step, run_record
from debias.training.sampling import Scheme, draw_epoch
from debias.training.vae import TrainConfig

CLASSIFIER = "classifier.pt"
OBJECTIVES = ("ce", "dbvae", "gce")


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """The VAE's training options (same fields, same defaults), then the classifier's objective and selection."""

    objective: str = "ce"  # "ce" or "dbvae" (paper Eq. 5)
    vae_weight: float = 0.001  # dbvae: weight of the VAE term next to the cross-entropy (see dbvae_loss)
    select: str = "best"  # "best" validation accuracy, or "last" epoch

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise DebiasError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.select not in ("best", "last"):
            raise DebiasError(f"select must be best or last, got {self.select!r}")


@dataclass
class TrainedClassifier:
    model: ConvVAE  # the selected epoch's weights, eval mode
    history: list[dict[str, Any]]
    selected_epoch: int
    path: Path
    mean_weights: np.ndarray  # each training row's sampling probability, averaged over the epochs (sums to 1)


def classifier_loss(
    model: ConvVAE, x: torch.Tensor, y: torch.Tensor, objective: str, vae_weight: float
) -> tuple[torch.Tensor, dict]:
    """One batch's loss for ``objective`` ("ce" or "dbvae") and its parts as floats, for the log."""
    if objective == "dbvae":
        return dbvae_loss(model, x, y, vae_weight)
    _, _, logits = model.encode(x)  # encoder + head only: the decoder is not part of the classifier
    if objective == "gce":
        loss = generalized_cross_entropy(logits.float(), y)
    else:
        loss = F.cross_entropy(logits.float(), y)
    acc = (logits.argmax(1) == y).float().mean()
    return loss, {"loss": loss.item(), "ce": loss.item(), "acc": acc.item()}


def generalized_cross_entropy(logits: torch.Tensor, y: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """GCE (Zhang & Sabuncu 2018), L = (1 - p_y^q) / q: its gradient is the cross-entropy's scaled by p_y^q, so rows
    the model already finds easy weigh more. A model trained with it leans on the easiest cue even harder than ERM
    does; LfF (Nam et al. 2020) uses it to build the biased model whose mistakes point at the cue-conflicting rows."""
    p = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1).clamp_min(1e-8)
    return ((1.0 - p.pow(q)) / q).mean()


def dbvae_loss(model: ConvVAE, x: torch.Tensor, y: torch.Tensor, vae_weight: float) -> tuple[torch.Tensor, dict]:
    """The DB-VAE's joint loss (Amini et al., Eq. 5) with the VAE term weighted: L = CE + w * (recon + beta * KL).

    With w = 1 this is exactly :func:`debias.models.vae_loss`. The reconstruction there is a Bernoulli NLL summed
    over pixels (thousands of nats against a cross-entropy below 1), so in the shared encoder it drowns the
    classifier's gradient; w < 1 restores the balance (the public MIT lab gets the same effect from a per-pixel mean
    reconstruction error and a KL weight of 5e-4). The VAE term is vae_loss's own, computed by vae_loss."""
    if vae_weight == 1.0:
        return vae_loss(model, x, y)
    # L = w * [CE + VAE] + (1 - w) * CE: vae_loss gives the bracket, one more head read-out gives the CE. The
    # encoder features are computed once and shared by both through the cache below.
    cache: dict[str, torch.Tensor] = {}
    hook = model.head.register_forward_hook(lambda _m, _i, out: cache.__setitem__("head", out))
    try:
        joint, parts = vae_loss(model, x, y)
    finally:
        hook.remove()
    logits = cache["head"][:, 2 * model.config.latent_dim :]
    ce = F.cross_entropy(logits.float(), y)
    loss = vae_weight * joint + (1.0 - vae_weight) * ce
    parts["loss"] = loss.item()
    return loss, parts


@torch.inference_mode()
def predict_proba(model: ConvVAE, images: ImageTensor, batch_size: int = 512) -> np.ndarray:
    """(n, n_classes) softmax probabilities, eval mode (each row independent of its batch)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        idx = np.arange(start, min(start + batch_size, len(images)))
        with autocast(device, bf16_when_auto=CLASSIFIER_BF16_WHEN_AUTO):
            _, _, logits = model.encode(images.batch(idx).to(device, non_blocking=True))
        out.append(torch.softmax(logits.float(), 1).cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, model.config.n_classes))
    return torch.cat(out).numpy().astype(np.float64)


def row_losses(model: ConvVAE, images: ImageTensor, y: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Each row's cross-entropy -log p(y | x) under ``model`` (eval mode), float64."""
    return cross_entropy_of(predict_proba(model, images, batch_size), y)


def cross_entropy_of(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's -log p(y | x) from (n, n_classes) probabilities, clipped away from log 0."""
    return -np.log(np.clip(probs[np.arange(len(y)), np.asarray(y)], 1e-12, 1.0))


def train_classifier(
    model_config: VAEConfig,
    config: ClassifierTrainConfig,
    train: ImageTensor,
    y_train: np.ndarray,
    scheme: Scheme,
    out_dir: str | Path,
    *,
    val: ImageTensor | None = None,
    y_val: np.ndarray | None = None,
    val_weights: np.ndarray | None = None,
    meta: dict[str, Any],
    resume: bool = False,
    progress: bool = True,
    description: str = "",
    ctx: DistContext | None = None,
) -> TrainedClassifier:
    """Train (or resume) one classifier; ``meta`` (data description, label, method, ...) is stored with it and a
    resume on different data or options is refused. ``ctx``: the torchrun context (default: joined here from the
    environment; single-process without torchrun)."""
    if model_config.n_classes < 2:
        raise DebiasError("a classifier needs a label with at least two classes")
    ctx = ctx or init_distributed(config.device)
    device = ctx.device
    local_batch = per_rank_batch(config.batch_size, ctx)
    run = open_run(out_dir, run_record(model_config, config, meta=meta), resume=resume, ctx=ctx, seed=config.seed,
                   progress=progress, history_name="history.csv")

    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    # channels_last: oneDNN (CPU) and cuDNN convolutions run faster on NHWC, which is also how the images are cached
    # (measured ~25 % per training step on CPU for both objectives, benchmarks/reweight_cost.py).
    model = ConvVAE(model_config).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    best: dict[str, Any] = {"epoch": 0, "val_accuracy": -1.0, "model": None}
    weight_sum = np.zeros(len(train))  # sum over epochs of the sampling probabilities, for the report
    if run.resumed is not None:
        model.load_state_dict(run.resumed["model"])
        optimizer.load_state_dict(run.resumed["optimizer"])
        best = dict(run.resumed["best"])
        if "weight_sum" in run.resumed:
            weight_sum = run.resumed["weight_sum"].numpy().astype(np.float64)

    loss_fn = functools.partial(classifier_loss, objective=config.objective, vae_weight=config.vae_weight)
    # The cross-entropy objectives (ce, gce) never run the decoder: DDP must be told, or it waits for its gradients.
    step = wrap(ModelWithLoss(model, loss_fn), ctx, find_unused_parameters=config.objective != "dbvae")
    y_all = torch.as_tensor(y_train, dtype=torch.long)
    n = len(train)
    for epoch in range(run.start_epoch, config.epochs):
        rng = run.seed_epoch(epoch)
        t0 = time.perf_counter()
        # DB-VAE: re-encode + refit the histograms (Algorithm 1); rank 0's result, the same on every rank.
        weights, winfo = broadcast_object(scheme.weights(epoch, model) if ctx.is_main else None, ctx)
        order = draw_epoch(weights, n, rng)  # the same global epoch on every rank (same seed, same weights)
        weight_sum += (1.0 / n) if weights is None else weights
        rows = run.shard(epoch, order, run.out.name)
        t1 = time.perf_counter()
        step.train()
        meter = EpochMeter()
        label = f"{description}epoch {epoch + 1}/{config.epochs}"
        with progress_bar(label, total=len(rows) * ctx.world_size, enabled=run.progress) as bar:
            for start in range(0, len(rows), local_batch):
                idx = rows[start : start + local_batch]
                x = train.batch(idx).to(device, non_blocking=True)
                y = y_all[idx].to(device, non_blocking=True)
                with autocast(device, bf16_when_auto=CLASSIFIER_BF16_WHEN_AUTO):
                    loss, parts = step(x, y)
                optimizer_step(optimizer, loss)
                meter.add(parts, len(idx))
                bar.advance(len(idx) * ctx.world_size, loss=parts["loss"])
        t2 = time.perf_counter()
        means, _ = meter.means(ctx)  # rank 0 logs the means over every rank's rows
        val_acc = None
        if val is not None and len(val) and ctx.is_main:
            val_acc = selection_accuracy(predict_proba(model, val), y_val, val_weights)
        val_acc = broadcast_object(val_acc, ctx)  # every rank keeps the same best epoch
        t3 = time.perf_counter()
        row = {
            "epoch": epoch + 1,
            **means,
            "val_accuracy": val_acc,
            **winfo,
            "weights_s": t1 - t0,  # re-encoding, density fit and drawing the epoch's rows
            "train_s": t2 - t1,
            "epoch_s": t2 - t0,  # weights + training passes; validation is timed apart
            "val_s": t3 - t2,
        }
        run.history.append(row)
        if val_acc is not None and val_acc > best["val_accuracy"]:
            best = {"epoch": epoch + 1, "val_accuracy": val_acc, "model": _cpu_copy(model)}
        if ctx.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
                     "weight_sum": torch.from_numpy(weight_sum)}
            save_checkpoint(run.checkpoint_state(epoch + 1, state), run.checkpoint)
        run.end_epoch(_epoch_line(description, row))

    selected = config.epochs
    if config.select == "best" and best["model"] is not None:
        model.load_state_dict(best["model"])
        selected = int(best["epoch"])
    model.eval()
    # The plain module's weights: the classifier loads without DDP or torchrun.
    path = run.finish(CLASSIFIER, {"model": model.state_dict(), "selected_epoch": selected})
    mean_weights = weight_sum / weight_sum.sum() if weight_sum.sum() > 0 else np.full(n, 1.0 / max(n, 1))
    return TrainedClassifier(
        model=model, history=run.history, selected_epoch=selected, path=path, mean_weights=mean_weights
    )


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[ConvVAE, dict[str, Any]]:
    """A trained classifier (eval mode) and its stored metadata, from classifier.pt or its run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / CLASSIFIER
    ckpt = load_checkpoint(p, map_location=device)
    model = ConvVAE(VAEConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def selection_accuracy(probs: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The validation figure the best epoch is chosen by: plain accuracy, or with ``weights`` the mean over classes
    of each class's accuracy weighted by the method's own sampling weights. A validation split carved from biased
    training rows is as biased as they are, and its plain accuracy rewards the shortcut (issue 12, cause 1); weighted
    by the same inverse density that draws the training rows, it estimates the accuracy on the reweighted
    distribution instead, without reading a group column."""
    correct = (probs.argmax(1) == y).astype(np.float64)
    if weights is None:
        return float(correct.mean())
    w = np.asarray(weights, dtype=np.float64)
    per_class = [np.average(correct[y == k], weights=w[y == k]) for k in np.unique(y) if w[y == k].sum() > 0]
    return float(np.mean(per_class)) if per_class else float(correct.mean())


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _epoch_line(description: str, row: dict[str, Any]) -> str:
    return description + epoch_line(row, ("epoch", "loss", "acc", "val_accuracy", "ess_fraction", "weights_s", "epoch_s"))
