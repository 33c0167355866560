"""`debias train-classifier`: train a label classifier with one of the sampling methods and evaluate it per group.

Methods (``--reweight``):
    auto       the default. A bias-amplified first model (generalized cross-entropy, ``stage1_epochs``; a
               small-receptive-field encoder, ``stage1_encoder="local"``, that can learn a colour, texture or blur
               shortcut but not the layout of the image, :class:`debias.models.ConvVAE`) is trained; if
               its losses concentrate on few rows (the ESS of LfF's first-epoch weights at most ``auto_gate`` × n: an
               easy cue explains most labels, a shortcut), the second model is trained as ``lff``; otherwise no
               shortcut was seen and it is trained plainly, as ``none`` (no label-free method measured here gains
               anything on such data, and every error signal there costs accuracy). Label-free: the gate reads the
               label and the first model only.
    cluster-errors  A first model is trained plainly for ``stage1_epochs``; each class's rows are
               clustered in its feature space, and a fresh model is trained on draws ∝ the first model's error rate
               on a row's cluster ÷ the cluster's size (inverse cluster density), half of each class's draws kept as in
               the data (:class:`debias.training.sampling.ClusterErrorWeights`). The epoch is chosen by validation accuracy
               weighted by the same weights. Label-free: no group column is read.
    rarity     inverse kNN density within each class in a bias-amplified (GCE, local encoder) first model's feature
               space (each feature mapped to its quantile among all training rows, ``rarity_quantiles``), with
               k = 5 % of the class's rows (``rarity_k``) and tempered to ``rarity_ess``
               (:class:`debias.training.sampling.ClassRarity`): sampling by rarity alone, no error signal in the
               weights. auto's gate decides whether to reweight at all: without a shortcut, plain training.
    none       ERM: every training row once per epoch.
    dbvae      DB-VAE, Amini et al. (AIES 2019) Algorithm 1: the classifier is the DB-VAE's own head, trained jointly
               with the VAE (Eq. 5); each epoch re-encodes the training rows, refits the latent histograms and draws
               the epoch's rows ∝ the inverse density (Eq. 3-4).
    two-stage  fixed weights from an earlier audit (``--weights DIR/scores.parquet``, joined on ``path``).
    jtt        Just Train Twice, Liu et al. (ICML 2021): ``jtt_epochs`` of ERM, then a fresh model trained with the
               rows the first one misclassified upsampled ``jtt_upweight`` times.
    lff        Learning from Failure, Nam et al. (NeurIPS 2020): a bias-amplified first model (generalized
               cross-entropy, ``stage1_epochs``, the local encoder as for auto) is frozen; every epoch of the second
               model draws half of each class's rows ∝ the relative difficulty L_B / (L_B + L_D)
               (:class:`debias.training.sampling.RelativeDifficulty`).
               Strongest label-free method on the blur protocol, but it upweights hard examples on natural data.

``oracle`` is a reference, not a method: group-balanced sampling over ``oracle_groups`` (`debias compare
--oracle-groups`), the ceiling that any resampling can reach.

Groups (``--eval-groups``) are read only after training, for the evaluation; the validation rows used to select the
epoch come from the training rows (seeded, stratified by label), never from the evaluation rows.

Outputs in ``--out``: predictions.csv, metrics.json, report.html, classifier.pt (+ checkpoint.pt, history.csv;
stage1/ or jtt_stage1/ for the first model).
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from debias.data import load_images
from debias.data.splits import validation_split
from debias.density.estimators import KNNDensity
from debias.density.rarity import DensityOptions
from debias.errors import DebiasError
from debias.evaluation.classifier_metrics import CROSS, classification_metrics
from debias.models.vae import ENCODERS
from debias.reports.classifier import auto_choice, weight_shares, write_report
from debias.runtime.checkpoint import atomic_write_table, write_json
from debias.runtime.device import CLASSIFIER_BF16_WHEN_AUTO, effective_precision
from debias.runtime.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    distributed_job,
)
from debias.training.classifier import (
    ClassifierTrainConfig,
    ImageTensor,
    TrainedClassifier,
    cross_entropy_of,
    predict_proba,
    row_losses,
    train_classifier,
)
from debias.training.sampling import (
    ClassRarity,
    ClusterErrorWeights,
    DBVAEAdaptive,
    Fixed,
    RelativeDifficulty,
    Uniform,
    audit_weights,
    encode_features,
    first_epoch_concentration,
    jtt_upweight_auto,
    jtt_weights,
    mix_within_classes,
    neighbours_for_class,
)
from debias.training.vae import encode_labels, vae_config

METHODS = ("auto", "cluster-errors", "lff", "rarity", "none", "dbvae", "two-stage", "jtt")
DEFAULT_METHOD = "auto"
FIRST_MODEL_METHODS = ("auto", "cluster-errors", "lff", "rarity")  # weigh rows with a first model trained beforehand
# reweight only when the biased first model has learned a shortcut (its losses concentrate), else train plainly
GATED_METHODS = ("auto", "rarity")
# A reference, not a method: group-balanced sampling that reads the group columns (``oracle_groups``). `compare`
# runs it beside the methods to show the ceiling that resampling can reach; it is never a --reweight choice.
ORACLE = "oracle"


@dataclass
class ClassifierJob:
    data: str
    label: str
    out: Path
    method: str = DEFAULT_METHOD
    where: list[str] = field(default_factory=list)
    eval_where: list[str] = field(default_factory=list)  # empty: evaluate on the validation rows
    eval_groups: list[str] = field(default_factory=list)
    subsample: list[str] = field(default_factory=list)  # COL=VALUE:FRACTION, applied to the training rows
    subsample_seed: int = 0  # fixed apart from --seed so that every method and seed sees the same reduced data
    image_size: int = 64
    channels: int | None = None
    latent_dim: int = 32
    beta: float = 1.0
    width: int = 32
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    val_fraction: float = 0.1
    # dbvae
    density: DensityOptions = field(default_factory=DensityOptions)
    warmup_epochs: int = 0
    per_class: bool = False
    # two-stage
    weights: Path | None = None
    # the oracle reference (compare --oracle-groups): group columns whose cross product is balanced
    oracle_groups: list[str] = field(default_factory=list)
    # jtt
    jtt_epochs: int = 2
    jtt_upweight: float | str = "auto"  # lambda_up, or "auto": (1 - error rate) / error rate
    # auto, cluster-errors, lff, rarity: weights from a first model trained for stage1_epochs
    stage1_epochs: int = 4
    stage1_loss: str | None = None  # "ce" or "gce" (bias-amplified, LfF's); None: gce for auto, lff, rarity, else ce
    stage1_encoder: str | None = None  # "conv" or "local" (small receptive field); None: local for auto, lff, rarity
    stage1_max_epochs: int = 8  # auto: more first-model epochs, one at a time, while its losses are not concentrated
    clusters: int = 8  # cluster-errors: k-means clusters per class
    auto_gate: float = 0.35  # auto: lff when the biased first model's weights have an ESS at most this fraction
    rarity_ess: float = 0.1  # rarity: effective sample size of the weights within each class, as a fraction
    rarity_k: int | None = None  # rarity: neighbours of the kNN density; None: 5 % of each class's rows, at least 20
    rarity_dims: int = 32  # both: leading principal axes of the features kept
    rarity_quantiles: bool = True  # rarity: each feature mapped to its quantile among all training rows first
    # best epoch by validation accuracy weighted by the method's own weights (first-model methods and the oracle)
    weighted_selection: bool = True
    resume: bool = False
    progress: bool = True
    show_table: bool = True


@dataclass
class ClassifierResult:
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    out: Path


# ------------------------------------------------------------------------------------------------ data helpers
def parse_subsample(spec: str) -> tuple[str, str, float]:
    """``COL=VALUE:FRACTION`` -> (COL, VALUE, FRACTION)."""
    col, eq, rest = spec.partition("=")
    value, colon, frac = rest.rpartition(":")
    try:
        fraction = float(frac)
    except ValueError:
        fraction = -1.0
    if not eq or not colon or not col.strip() or not 0.0 <= fraction <= 1.0:
        raise DebiasError(f"bad --subsample {spec!r}: expected COL=VALUE:FRACTION with FRACTION in [0, 1]")
    return col.strip(), value.strip(), fraction


def apply_subsample(table: pd.DataFrame, rows: np.ndarray, specs: list[str], seed: int) -> np.ndarray:
    """Keep a seeded FRACTION of the rows where COL == VALUE (string comparison, as --where), all others."""
    for spec in specs:
        col, value, fraction = parse_subsample(spec)
        if col not in table.columns:
            raise DebiasError(f"unknown column {col!r} in --subsample (available: {', '.join(table.columns)})")
        match = rows[table[col].astype(str).to_numpy()[rows] == value]
        if len(match) == 0:
            raise DebiasError(f"--subsample {spec}: no training rows have {col}={value}")
        rng = np.random.default_rng([seed, zlib.crc32(spec.encode())])
        drop = rng.permutation(match)[int(round(len(match) * fraction)) :]
        rows = np.setdiff1d(rows, drop)
    return rows


def label_values(column: pd.Series, classes: list[str]) -> list[Any]:
    """The label's own value for each class string (first occurrence), as plain Python scalars."""
    first = column.groupby(column.astype(str)).first()
    return [first[c].item() if hasattr(first[c], "item") else first[c] for c in classes]


def _require(table: pd.DataFrame, columns: list[str], option: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DebiasError(f"{option} column(s) {missing} not in the data (columns: {', '.join(table.columns)})")


def _rows_fingerprint(fingerprint: str, rows: np.ndarray) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- the job
def run_train_classifier(job: ClassifierJob) -> ClassifierResult:
    """Under torchrun every rank trains (data-parallel); rank 0 alone evaluates and writes the outputs, the other
    ranks return a result with empty metrics and predictions."""
    # Join the process group first, so that only rank 0 reports progress. Every rank loads the same images; the
    # decode cache is safe to build from several processes at once (debias/data/cache.py: a lock, then one builder).
    with distributed_job(job.train.device) as ctx:
        return _run_train_classifier(job, ctx)


def _run_train_classifier(job: ClassifierJob, ctx: DistContext) -> ClassifierResult:
    if job.method not in METHODS and job.method != ORACLE:
        raise DebiasError(f"--reweight must be one of {', '.join(METHODS)}, got {job.method!r}")
    if (job.method == ORACLE) != bool(job.oracle_groups):
        raise DebiasError("the oracle reference needs --oracle-groups, and only it reads them")
    job.density.check()
    if (job.method == "two-stage") != (job.weights is not None):
        raise DebiasError("--weights DIR/scores.parquet is needed by --reweight two-stage, and only by it")
    if not 0.0 <= job.val_fraction < 1.0:
        raise DebiasError("--val-fraction must be in [0, 1)")
    if job.jtt_upweight != "auto" and not (isinstance(job.jtt_upweight, (int, float)) and job.jtt_upweight >= 1):
        raise DebiasError(f"--jtt-upweight must be 'auto' or a number >= 1, got {job.jtt_upweight!r}")
    if job.stage1_loss not in (None, "ce", "gce"):
        raise DebiasError(f"--stage1-loss must be ce or gce, got {job.stage1_loss!r}")
    if job.stage1_encoder not in (None, *ENCODERS):
        raise DebiasError(f"--stage1-encoder must be one of {', '.join(ENCODERS)}, got {job.stage1_encoder!r}")
    if not 0 < job.auto_gate <= 1:
        raise DebiasError(f"--auto-gate must be in (0, 1], got {job.auto_gate}")
    k = 1 if job.rarity_k is None else job.rarity_k
    if min(job.stage1_epochs, job.clusters, k, job.rarity_dims) < 1 or not 0 < job.rarity_ess <= 1:
        raise DebiasError("--stage1-epochs, --clusters, --rarity-k and --rarity-dims must be >= 1, --rarity-ess in (0, 1]")
    if job.out.joinpath("metrics.json").exists() and not job.resume:
        raise DebiasError(f"{job.out} already holds a finished run; choose another --out")

    progress = job.progress and ctx.is_main
    data = load_images(job.data, where=job.where, image_size=job.image_size, channels=job.channels, progress=progress)
    table = data.table
    _require(table, [job.label], "--label")
    rows = np.flatnonzero(table[job.label].notna().to_numpy())
    if len(rows) < len(table) and progress:
        print(f"{len(table) - len(rows)} training rows without a {job.label!r} value left out")
    rows = apply_subsample(table, rows, job.subsample, job.subsample_seed)
    y_rows, classes = encode_labels(table[job.label].iloc[rows])
    if len(classes) < 2:
        raise DebiasError(f"--label {job.label!r} has a single value ({classes[0]}); a classifier needs two or more")
    values = label_values(table[job.label].iloc[rows], classes)
    fit_pos, val_pos = validation_split(y_rows, job.val_fraction, job.train.seed)
    fit_rows, val_rows = rows[fit_pos], rows[val_pos]
    y_fit, y_val = y_rows[fit_pos], y_rows[val_pos]

    # The evaluation rows are only looked up now (to fail early on a bad column); they are read after training.
    if job.eval_where:
        eval_data = load_images(
            job.data, where=job.eval_where, image_size=job.image_size, channels=data.channels, progress=progress
        )
        eval_table = eval_data.table
        _require(eval_table, [job.label, *job.eval_groups], "--eval-where/--eval-groups")
        unseen = sorted(set(eval_table[job.label].dropna().astype(str)) - set(classes))
        if unseen:
            raise DebiasError(f"evaluation rows have {job.label} values never seen in training: {unseen[:5]}")
        overlap = int(eval_table["path"].isin(table["path"].iloc[fit_rows]).sum())
        if overlap and progress:
            print(f"warning: {overlap} evaluation rows are also training rows; their accuracy will be optimistic")
    else:
        if len(val_rows) == 0:
            raise DebiasError("nothing to evaluate: give --eval-where or a --val-fraction above 0")
        eval_data, eval_table = data, table.iloc[val_rows].reset_index(drop=True)
        _require(eval_table, job.eval_groups, "--eval-groups")

    model_config = vae_config(
        image_size=job.image_size,
        channels=data.channels,
        latent_dim=job.latent_dim,
        beta=job.beta,
        width=job.width,
        n_classes=len(classes),
        classes=classes,
        vae_class=None,  # a classifier between faces: the VAE loss applies to every row
    )
    train_cfg = replace(job.train, objective="dbvae" if job.method == "dbvae" else "ce")
    method_options = _method_options(job)
    meta = {
        "method": job.method,
        "method_options": method_options,
        "source": job.data,
        "where": list(job.where),
        "subsample": list(job.subsample),
        "fingerprint": _rows_fingerprint(data.fingerprint, fit_rows),
        "label": job.label,
        "classes": classes,
        "label_values": values,
        "n_train": int(len(fit_rows)),
        "n_val": int(len(val_rows)),
        "train_config": {k: v for k, v in job_signature(job)["train"].items() if k != "epochs"},
    }
    train_images, val_images = ImageTensor(data, fit_rows), ImageTensor(data, val_rows)
    extra: dict[str, Any] = {}
    selection_weights = None

    if job.method == "none":
        scheme: Any = Uniform(len(fit_rows))
    elif job.method == "two-stage":
        scheme = Fixed("two-stage", audit_weights(job.weights, table["path"].iloc[fit_rows]))
    elif job.method == "dbvae":
        scheme = DBVAEAdaptive(
            train_images.batch,
            len(fit_rows),
            job.density.build,
            warmup_epochs=job.warmup_epochs,
            labels=y_fit if job.per_class else None,
        )
    elif job.method == ORACLE:
        # Reads the group columns: a ceiling for the comparison, never a method. Every group of the cross product
        # is drawn equally often, and the epoch is chosen by validation accuracy with the same group weights.
        _require(table, job.oracle_groups, "--oracle-groups")
        scheme = Fixed(ORACLE, group_balanced_weights(table.iloc[fit_rows], job.oracle_groups))
        if job.weighted_selection:
            selection_weights = group_balanced_weights(table.iloc[val_rows], job.oracle_groups)
    elif job.method in FIRST_MODEL_METHODS:
        # A first model (plain for cluster-errors; bias-amplified and local for auto, lff and rarity) trained for a
        # few epochs weighs the rows.
        def train_first(epochs: int, resume: bool) -> TrainedClassifier:
            return train_classifier(
                replace(model_config, encoder=stage1_encoder(job)),
                replace(train_cfg, epochs=epochs, select="last", objective=stage1_loss(job)),
                train_images,
                y_fit,
                Uniform(len(fit_rows)),
                job.out / "stage1",
                meta={**meta, "method": f"{job.method}-stage1"},
                resume=resume,
                progress=job.progress,
                description="stage 1 ",
                ctx=ctx,
            )

        first = train_first(job.stage1_epochs, job.resume)
        # auto: LfF's premise is a cue the biased model learns early. One that has not concentrated its losses yet gets
        # more epochs, one at a time, up to stage1_max_epochs (measured: on one blur seed in ten the local first model
        # had not learned the blur after 4 epochs). Data without a shortcut pays those epochs and then trains plainly.
        gate_probs = None  # the gate's pass over the training rows, reused by the weights when the model is the same
        while job.method in GATED_METHODS and len(first.history) < job.stage1_max_epochs:
            gate_probs = predict_proba(first.model, train_images) if ctx.is_main else None
            if broadcast_object(_concentrated(job, gate_probs, y_fit) if ctx.is_main else None, ctx):
                break
            first, gate_probs = train_first(len(first.history) + 1, resume=True), None
        t_weights = time.perf_counter()
        # rank 0's weights on every rank, so that all ranks draw the same epochs
        payload = None
        if ctx.is_main:
            payload = _first_model_weights(job, first.model, train_images, val_images, y_fit, y_val, gate_probs)
        kind, w, w_val, info = broadcast_object(payload, ctx)
        extra["first_model"] = {**info, "epochs": len(first.history), "epoch_s": [h["epoch_s"] for h in first.history],
                                "weights_s": time.perf_counter() - t_weights}  # its cost, for the cost per epoch
        if job.method == "auto" and progress:
            print(auto_choice(info))
        if kind == "lff":  # w: the biased model's losses; the weights are recomputed every epoch from the new model
            scheme = RelativeDifficulty(w, lambda model: row_losses(model, train_images, y_fit), y_fit)
        elif kind == "none":  # auto saw no shortcut
            scheme = Uniform(len(fit_rows))
        else:
            scheme = Fixed(job.method, w)
        if job.weighted_selection:
            selection_weights = w_val
    else:  # jtt: an ERM model for jtt_epochs, then its training errors upsampled in a second, fresh training
        first = train_classifier(
            model_config,
            replace(train_cfg, epochs=job.jtt_epochs, select="last"),
            train_images,
            y_fit,
            Uniform(len(fit_rows)),
            job.out / "jtt_stage1",
            meta={**meta, "method": "jtt-stage1"},
            resume=job.resume,
            progress=job.progress,
            description="jtt stage 1 ",
            ctx=ctx,
        )
        # rank 0's error set on every rank, so that all ranks draw stage 2's epochs from the same weights
        errors = predict_proba(first.model, train_images).argmax(1) != y_fit if ctx.is_main else None
        errors = broadcast_object(errors, ctx)
        upweight = jtt_upweight_auto(errors) if job.jtt_upweight == "auto" else float(job.jtt_upweight)
        scheme = Fixed("jtt", jtt_weights(errors, upweight))
        extra["jtt"] = {
            "stage1_epochs": job.jtt_epochs,
            "upweight": upweight,
            "error_set_size": int(errors.sum()),
            "error_set_fraction": float(errors.mean()),
            "stage1_epoch_s": [h["epoch_s"] for h in first.history],
        }

    trained = train_classifier(
        model_config,
        train_cfg,
        train_images,
        y_fit,
        scheme,
        job.out,
        val=val_images,
        y_val=y_val,
        val_weights=selection_weights,
        meta=meta,
        resume=job.resume,
        progress=job.progress,
        description="" if job.method != "jtt" else "jtt stage 2 ",
        ctx=ctx,
    )
    if not ctx.is_main:  # data-parallel helpers are done: evaluation and outputs are rank 0's
        barrier(ctx)  # leave together: a rank tearing down its connections early can abort the other's (gloo)
        return ClassifierResult(metrics={}, predictions=pd.DataFrame(), out=job.out)

    # ---- evaluation: the first time group columns are read
    eval_images = ImageTensor(eval_data) if job.eval_where else val_images
    probs = predict_proba(trained.model, eval_images)
    predictions = eval_table.copy()
    predictions["prediction"] = [values[i] for i in probs.argmax(1)]
    predictions["probability"] = probs.max(1)
    # Rows without a label are predicted but cannot be scored.
    scored = eval_table[job.label].notna().to_numpy()
    lookup = {c: i for i, c in enumerate(classes)}
    y_eval = eval_table[job.label][scored].astype(str).map(lookup).to_numpy(dtype=np.int64)
    evaluation = classification_metrics(
        eval_table[scored].reset_index(drop=True), y_eval, probs[scored], job.eval_groups
    )

    hist = trained.history
    metrics: dict[str, Any] = {
        "method": job.method,
        "seed": job.train.seed,
        "label": job.label,
        "classes": values,
        "eval_set": "eval-where " + " ".join(job.eval_where) if job.eval_where else "validation rows",
        "eval_groups": list(job.eval_groups),
        **{k: v for k, v in evaluation.items() if k != "groupings"},
        "groupings": evaluation["groupings"],
        "selected_epoch": trained.selected_epoch,
        "validation_accuracy": next(
            (h["val_accuracy"] for h in hist if h["epoch"] == trained.selected_epoch), None
        ),
        "n_train": int(len(fit_rows)),
        "n_val": int(len(val_rows)),
        "n_eval": int(len(eval_table)),
        "effective_sample_size_per_epoch": [h["ess"] for h in hist],
        "epoch_s": [h["epoch_s"] for h in hist],
        "weights_s": [h["weights_s"] for h in hist],
        "precision": effective_precision(ctx.device, bf16_when_auto=CLASSIFIER_BF16_WHEN_AUTO),
        "history": hist,
        **extra,
        "config": {**job_signature(job), "model": model_config.to_dict()},
    }
    # What the debiaser did, per group: each group's share of the draws against its share of the training rows.
    # The group columns of the training rows are read here, after training, for display only.
    share_columns = [c for c in job.eval_groups if c in table.columns]
    fit_table = table.iloc[fit_rows].reset_index(drop=True)
    shares = weight_shares(fit_table, trained.mean_weights, share_columns) if share_columns else {}
    metrics["weight_shares"] = {name: df.reset_index().to_dict("records") for name, df in shares.items()}
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_table(predictions, job.out / "predictions.csv")
    write_json(metrics, job.out / "metrics.json")
    write_report(
        job.out / "report.html",
        metrics=metrics,
        history=hist,
        weights=trained.mean_weights,
        images=train_images.pixels(),
        labels=y_fit,
        class_values=values,
        paths=fit_table["path"].astype(str).tolist(),
        shares=shares,
        selection=_selection_text(job, selection_weights is not None),
    )
    if job.show_table:
        print_group_table(metrics)
        print_weight_shares(shares)
    barrier(ctx)
    return ClassifierResult(metrics=metrics, predictions=predictions, out=job.out)


def group_balanced_weights(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """1 / (rows in the row's group) for the cross product of ``columns``, as probabilities (the oracle reference)."""
    if len(table) == 0:
        return np.zeros(0)
    sizes = table.groupby([table[c].astype(str) for c in columns])[columns[0]].transform("size").to_numpy(float)
    w = 1.0 / sizes
    return w / w.sum()


def job_signature(job: ClassifierJob) -> dict[str, Any]:
    """Everything that decides a run's result apart from the seed and the device (JSON-safe): two runs with equal
    signatures and seeds are the same experiment."""
    train = {k: v for k, v in asdict(job.train).items() if k not in ("seed", "device")}
    train["objective"] = "dbvae" if job.method == "dbvae" else "ce"
    if job.method != "dbvae":
        del train["vae_weight"]  # unused by the other methods: their runs stay comparable whatever it is set to
    return {
        "data": job.data,
        "label": job.label,
        "method": job.method,
        "where": list(job.where),
        "eval_where": list(job.eval_where),
        "eval_groups": list(job.eval_groups),
        "subsample": list(job.subsample),
        "subsample_seed": job.subsample_seed,
        "image_size": job.image_size,
        "channels": job.channels,
        "latent_dim": job.latent_dim,
        "beta": job.beta,
        "width": job.width,
        "train": train,
        "val_fraction": job.val_fraction,
        "method_options": _method_options(job),
    }


def _method_options(job: ClassifierJob) -> dict[str, Any]:
    if job.method == "dbvae":
        return {"density": asdict(job.density), "warmup_epochs": job.warmup_epochs, "per_class": job.per_class}
    if job.method == "jtt":
        return {"jtt_epochs": job.jtt_epochs, "jtt_upweight": job.jtt_upweight}
    if job.method == "two-stage":
        return {"weights": str(job.weights)}
    if job.method == ORACLE:
        return {"oracle_groups": list(job.oracle_groups), "weighted_selection": job.weighted_selection}
    if job.method in FIRST_MODEL_METHODS:
        opts = {
            "stage1_epochs": job.stage1_epochs,
            "stage1_loss": stage1_loss(job),
            "stage1_encoder": stage1_encoder(job),
            "dims": job.rarity_dims,
            "weighted_selection": job.weighted_selection,
        }
        if job.method == "rarity":
            return {**opts, "rarity_ess": job.rarity_ess, "rarity_k": job.rarity_k,
                    "rarity_quantiles": job.rarity_quantiles, "auto_gate": job.auto_gate,
                    "stage1_max_epochs": job.stage1_max_epochs}
        if job.method == "lff":
            return {k: v for k, v in opts.items() if k != "dims"}
        if job.method == "auto":
            return {**opts, "auto_gate": job.auto_gate, "stage1_max_epochs": job.stage1_max_epochs}
        return {**opts, "clusters": job.clusters}
    return {}


def _first_model_weights(
    job: ClassifierJob,
    model: Any,
    train: ImageTensor,
    val: ImageTensor,
    y_fit: np.ndarray,
    y_val: np.ndarray,
    train_probs: np.ndarray | None = None,
) -> tuple[str, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """What the first model gives the second training: (kind, w, w_val, info). kind "lff": w are the biased model's
    losses (the weights follow every epoch); otherwise w are fixed sampling weights. w_val weighs the validation rows
    for the epoch choice (None: plain accuracy). ``auto`` reads how concentrated the biased model's losses are and
    picks lff or, without a shortcut, plain training, kind "none"
    (:func:`debias.training.sampling.first_epoch_concentration`). ``train_probs``: the model's probabilities on the
    training rows when the caller has them already (auto's gate), so that the pass is not run twice."""
    info: dict[str, Any] = {}
    kind = job.method
    # one pass of the first model over the training rows serves the gate (auto, rarity), the losses (lff, auto) and
    # the errors (cluster-errors)
    probs = train_probs if train_probs is not None else predict_proba(model, train)
    errors = probs.argmax(1) != y_fit
    if kind != "rarity":  # rarity's weights read no error signal
        info["error_rate"] = float(errors.mean()) if len(errors) else 0.0
    if kind in GATED_METHODS:
        # For rarity the gate is a switch only, its weights stay the density's alone (ungated, on natural UTKFace the
        # inverse density chased odd faces and cost 7.0 points of accuracy).
        info["first_epoch_ess"] = _gate_value(probs, y_fit)
        info["gate"] = job.auto_gate
        shortcut = info["first_epoch_ess"] <= job.auto_gate
        kind = info["chose"] = ("lff" if kind == "auto" else kind) if shortcut else "none"
        if kind == "none":  # no shortcut seen: plain training, plain validation accuracy
            return kind, np.full(len(y_fit), 1.0 / len(y_fit)), None, info
    if kind == "lff":  # validation: half of each class's weight on the rows the biased model gets wrong
        val_errors = predict_proba(model, val).argmax(1) != y_val
        return kind, cross_entropy_of(probs, y_fit), mix_within_classes(val_errors.astype(np.float64), y_val, 0.5), info
    feats = encode_features(model, train.batch, len(train))
    feats_val = encode_features(model, val.batch, len(val))
    if kind == "rarity":
        if job.rarity_quantiles:
            feats, feats_val = _to_quantiles(feats, feats_val)
        est: Any = ClassRarity(
            lambda n_rows: KNNDensity(
                n_neighbors=neighbours_for_class(n_rows) if job.rarity_k is None else job.rarity_k,
                n_components=job.rarity_dims,
            ),
            target_ess=job.rarity_ess,
        ).fit(feats, y_fit)
        # the k each class's density used, by class index (the default scales with the class): repeatable by hand
        info["rarity_k"] = {str(c): int(d.n_neighbors) for c, d in est.estimators_.items()}
    else:
        est = ClusterErrorWeights(job.clusters, job.rarity_dims, seed=job.train.seed).fit(feats, y_fit, errors)
    return kind, est.weights_, est.weights(feats_val, y_val) if len(y_val) else np.zeros(0), info


def _to_quantiles(feats: np.ndarray, feats_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature mapped to its quantile among *all* training rows (no label read), for `rarity`'s densities.

    Pooled activations have a few heavy-tailed features that otherwise decide every distance. Fitted on the whole set,
    the scale of a feature is set by both classes, so a cue common in one class and rare in the other (blur: half the
    female faces, 2 % of the male ones) spans a wide range where it is rare. Fitted within each class instead, the
    transform squeezes that class's rare tail into a narrow band and hides it (measured: patch closed 0.03 of the gap).
    """
    from sklearn.preprocessing import QuantileTransformer

    qt = QuantileTransformer(n_quantiles=max(2, min(1000, len(feats))), subsample=10**9).fit(feats)
    return qt.transform(feats), (qt.transform(feats_val) if len(feats_val) else feats_val)


def _gate_value(train_probs: np.ndarray, y_fit: np.ndarray) -> float:
    """The gate of auto and rarity: how concentrated the biased first model's losses are (the ESS fraction of LfF's
    first-epoch weights, from its probabilities on the training rows); low = a shortcut learned."""
    return first_epoch_concentration(cross_entropy_of(train_probs, y_fit), y_fit)


def _concentrated(job: ClassifierJob, train_probs: np.ndarray, y_fit: np.ndarray) -> bool:
    return _gate_value(train_probs, y_fit) <= job.auto_gate


def stage1_loss(job: ClassifierJob) -> str:
    """The first model's objective: as given, else the bias-amplifying GCE for auto, lff and rarity (a representation
    in which the shortcut is the leading factor, so that the rows without it sit apart) and plain CE for
    cluster-errors."""
    return job.stage1_loss or ("gce" if job.method in ("lff", "auto", "rarity") else "ce")


def stage1_encoder(job: ClassifierJob) -> str:
    """The first model's encoder: as given, else the small-receptive-field one for auto, lff and rarity (a model that
    can learn a colour, texture or sharpness shortcut and not the task, so that its failures, and its feature space,
    are organised by the shortcut; :class:`debias.models.ConvVAE`) and the classifier's own for cluster-errors."""
    return job.stage1_encoder or ("local" if job.method in ("lff", "auto", "rarity") else "conv")


def _selection_text(job: ClassifierJob, weighted: bool) -> str:
    if job.train.select == "last":
        return "the last epoch"
    if weighted:
        return "best validation accuracy weighted by the method's own sampling weights, mean over classes"
    return "best validation accuracy"


def print_weight_shares(shares: dict[str, pd.DataFrame], console: Console | None = None) -> None:
    """The draws each training group got against its share of the rows (computed after training, display only)."""
    console = console or Console()
    for name, df in shares.items():
        table = Table(title=f"share of the draws per {name} (training rows; computed after training)")
        for col in ("group", "rows", "share of data", "share of draws", "ratio"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for group, r in df.iterrows():
            table.add_row(
                str(group), str(int(r["n"])), f"{r['data_share']:.1%}", f"{r['draw_share']:.1%}", f"{r['ratio']:.2f}x"
            )
        console.print(table)


def print_group_table(metrics: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    auroc = metrics["auroc"]
    title = (
        f"{metrics['method']}: accuracy {metrics['accuracy']:.1%}"
        + (f", AUROC {auroc:.3f}" if auroc is not None else "")
        + f" on {metrics['n_eval']} rows ({metrics['eval_set']})"
    )
    table = Table(title=title)
    for col, justify in (("grouping", "left"), ("group", "left"), ("n", "right"), ("accuracy", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, g in metrics["groupings"].items():
        for i, (group, row) in enumerate(g["groups"].items()):
            worst = group == g["worst_group"]
            acc = f"{row['accuracy']:.1%}" + (" (worst)" if worst else "")
            table.add_row(name if i == 0 else "", group, str(row["n"]), f"[bold red]{acc}[/]" if worst else acc)
        table.add_row("", "[dim]variance of accuracies[/]", "", f"[dim]{g['accuracy_variance']:.5f}[/]", end_section=True)
    console.print(table)
    if metrics["groupings"]:
        finest = list(metrics["groupings"])[-1]
        console.print(
            f"worst group ({finest.replace(CROSS, ' x ')}): {metrics['worst_group_accuracy']:.1%}; "
            f"selected epoch {metrics['selected_epoch']} (validation accuracy "
            f"{metrics['validation_accuracy'] or float('nan'):.1%})"
        )
