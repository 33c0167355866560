"""The `debias` command line (also `python -m debias`).

The end-to-end jobs live in `pipelines/`; each command imports its job lazily so that `debias --help` stays fast and
the library never imports the pipelines at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from debias.errors import DebiasError

app = typer.Typer(
    help="Find what an image dataset is missing, reweight training towards it, and flag novel inputs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Image folder, CSV/Parquet manifest with a 'path' column, folder of MNIST idx files, or builtin:NAME.",
    ),
]
WhereOpt = Annotated[
    Optional[list[str]],
    typer.Option("--where", help="Keep rows where COL=VALUE (repeatable; same column: any of, columns: all of)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


def _apply_precision(value: str) -> str:
    from debias.runtime.device import set_precision

    set_precision(value)  # for the whole process: every forward pass of this command
    return value


PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision", callback=_apply_precision,
        help="auto (bf16 on CUDA and on CPUs with AMX or AVX-512-BF16, else fp32), fp32 or bf16.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def train(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Run directory: model, config, checkpoint, loss curve.")],
    where: WhereOpt = None,
    label: Annotated[Optional[str], typer.Option(help="Label column: trains a DB-VAE with a class head.")] = None,
    vae_class: Annotated[
        Optional[str], typer.Option(help="DB-VAE: apply the VAE loss only to this label value (default: all).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    image_size: Annotated[int, typer.Option(min=28, max=128)] = 64,
    channels: Annotated[Optional[int], typer.Option(help="1 or 3 (default: from the data).")] = None,
    latent_dim: Annotated[int, typer.Option(min=1)] = 32,
    beta: Annotated[float, typer.Option(min=0.0)] = 1.0,
    width: Annotated[int, typer.Option(min=4, help="Channels of the first convolution.")] = 32,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a beta-VAE (or a DB-VAE when --label is given) on a data source."""
    from debias.pipelines.train import TrainJob, run_train
    from debias.training.vae import TrainConfig

    job = TrainJob(
        data=data,
        out=out,
        where=where or [],
        label=label,
        vae_class=vae_class,
        image_size=image_size,
        channels=channels,
        latent_dim=latent_dim,
        beta=beta,
        width=width,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device),
        resume=resume,
        progress=not quiet,
    )
    path = run_train(job)
    from debias.runtime.distributed import is_main_process

    if is_main_process():  # under torchrun: once, from rank 0
        typer.echo(f"model written to {path}")


def _temperature(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise DebiasError(f"--temperature must be 'auto' or a number, got {value!r}") from None


@app.command()
def audit(
    model: Annotated[Path, typer.Option("--model", help="Run directory written by 'debias train'.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for scores.parquet/.csv, summary.json, report.html.")],
    where: WhereOpt = None,
    group_by: Annotated[Optional[str], typer.Option(help="Comma-separated columns for per-group statistics.")] = None,
    estimator: Annotated[
        str, typer.Option(help="Rarity: knn-recon (kNN latent density + reconstruction error), knn, histogram "
                          "(paper Eq. 3-4), histogram-max (lab), gmm, recon.")
    ] = "knn-recon",
    n_neighbors: Annotated[int, typer.Option(min=1, help="knn, knn-recon: neighbours of the kNN density.")] = 5,
    bins: Annotated[int, typer.Option(min=1, help="Histogram bins per latent dimension.")] = 10,
    alpha: Annotated[float, typer.Option(min=0.0, help="Smoothing added to each bin probability.")] = 0.001,
    combine: Annotated[str, typer.Option(help="product (paper Eq. 3-4) or max (public lab).")] = "product",
    temperature: Annotated[str, typer.Option(help="'auto' or a number T: weights ∝ exp(T · rarity).")] = "auto",
    target_ess: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="With --temperature auto: effective sample size / n.")
    ] = 0.5,
    dims: Annotated[str, typer.Option(help="all, or active (skip collapsed latent dimensions).")] = "all",
    whiten: Annotated[bool, typer.Option(help="Rotate latents onto principal axes before the histograms.")] = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    report: Annotated[bool, typer.Option(help="Write report.html.")] = True,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Then serve the model and this audit, print the URL of /audit, open it.")
    ] = False,
    engine: Annotated[str, typer.Option(help="local, or ray: decode + encode as a Ray Data job (pip install debias[ray]).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray engines: cluster address (default: start a local Ray).")] = None,
    actors: Annotated[Optional[int], typer.Option(min=1, help="Ray: encoder actors (default: one per GPU, else per CPU).")] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(min=0.0, help="Ray: GPUs per actor (default: 1 if the cluster has GPUs).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score every sample for rarity and write scores, a summary and an HTML report."""
    from debias.density.rarity import DensityOptions
    from debias.pipelines.audit import AuditJob, run_audit

    job = AuditJob(
        model=model,
        data=data,
        out=out,
        where=where or [],
        group_by=[c.strip() for c in group_by.split(",") if c.strip()] if group_by else [],
        estimator=estimator,
        n_neighbors=n_neighbors,
        density=DensityOptions(
            bins=bins,
            alpha=alpha,
            combine=combine,
            temperature=_temperature(temperature),
            target_ess=target_ess,
            dims=dims,
            whiten=whiten,
        ),
        device=device,
        batch_size=batch_size,
        report=report,
        progress=not quiet,
    )
    job.density.check()
    if engine == "ray":
        from debias.pipelines.ray_audit import RayAuditOptions, run_ray_audit

        result = run_ray_audit(job, RayAuditOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor))
    elif engine == "local":
        result = run_audit(job)
    else:
        raise DebiasError(f"--engine must be local or ray, got {engine!r}")
    s = result.summary
    if s["groups"]:
        from rich.console import Console

        from debias.pipelines.audit import group_table

        for name, groups in s["groups"].items():
            Console().print(group_table(name, groups))
    typer.echo(
        f"audited {s['n_images']} images ({s['n_skipped']} skipped) with {s['rarity_estimator']} rarity; effective "
        f"sample size {s['effective_sample_size']:.0f} ({s['effective_sample_fraction']:.0%}; untempered inverse "
        f"density: {s['untempered_effective_sample_fraction']:.1%}); outputs in {result.out}"
    )
    if open_browser:
        from debias.pipelines.serve import serve_audit

        serve_audit(model, result.out, device=device)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's run and audit.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    n: Annotated[int, typer.Option(min=200, help="Images in the built-in dataset.")] = 4000,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train and audit on the built-in shapes dataset and show that its rare group was found."""
    from debias.pipelines.demo import run_demo

    run_demo(out=out, epochs=epochs, n=n, device=device, progress=not quiet)


# -- train-classifier (issue 3) ----------------------------------------------------------------------------------
_ClsOut = Annotated[Path, typer.Option("--out", help="Run directory: predictions.csv, metrics.json, classifier.pt.")]
_LabelOpt = Annotated[str, typer.Option("--label", help="Column to predict (binary or multi-class; strings or integers).")]
_EvalWhereOpt = Annotated[
    Optional[list[str]],
    typer.Option("--eval-where", help="Evaluation rows, COL=VALUE (repeatable). Default: the validation rows."),
]
_EvalGroupsOpt = Annotated[
    Optional[str],
    typer.Option("--eval-groups", help="Comma-separated columns for per-group accuracy. Used only for evaluation."),
]
_SubsampleOpt = Annotated[
    Optional[list[str]],
    typer.Option("--subsample", help="COL=VALUE:FRACTION: keep that fraction of the training rows with COL=VALUE."),
]
_ClsEpochs = Annotated[int, typer.Option(min=1, help="Training epochs (JTT: of its second training).")]
_ClsImageSize = Annotated[int, typer.Option(min=28, max=128)]
_ClsLatent = Annotated[int, typer.Option(min=1, help="Latent dimensions of the (DB-)VAE encoder.")]
_ClsWidth = Annotated[int, typer.Option(min=4, help="Channels of the first convolution.")]
_ClsBeta = Annotated[float, typer.Option(min=0.0, help="dbvae: weight of the KL term.")]
_ClsValFraction = Annotated[
    float, typer.Option(min=0.0, max=0.9, help="Share of the training rows held out to select the epoch.")
]
_ClsSelect = Annotated[str, typer.Option(help="best (validation accuracy) or last epoch.")]
_ClsBins = Annotated[int, typer.Option(min=1, help="dbvae: histogram bins per latent dimension.")]
_ClsAlpha = Annotated[float, typer.Option(min=0.0, help="dbvae: smoothing alpha of Eq. 4 (smaller debiases more).")]
_ClsTemperature = Annotated[str, typer.Option(help="dbvae: 'auto' or a number scaling the log-weights.")]
_ClsCombine = Annotated[str, typer.Option(help="dbvae: product (paper Eq. 3-4) or max (public lab) over dimensions.")]
_ClsTargetEss = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="dbvae, --temperature auto: effective sample size / n.")
]
_ClsWarmup = Annotated[int, typer.Option(min=0, help="dbvae: epochs of uniform sampling before the weights.")]
_ClsDims = Annotated[str, typer.Option(help="dbvae: all, or active (leading principal axes / non-collapsed dims).")]
_ClsWhiten = Annotated[bool, typer.Option(help="dbvae: histograms on the latents' principal axes.")]
_ClsPerClass = Annotated[bool, typer.Option(help="dbvae: fit one latent density per label class.")]
_ClsWeights = Annotated[Optional[Path], typer.Option("--weights", help="two-stage: scores.parquet of an audit.")]
_ClsJttEpochs = Annotated[int, typer.Option(min=1, help="jtt: epochs of the first (ERM) training.")]
_ClsJttUp = Annotated[
    str, typer.Option(help="jtt: how many times the error set is upsampled, or auto: (1 - error rate) / error rate.")
]
_ClsStage1Epochs = Annotated[
    int, typer.Option(min=1, help="cluster-errors, rarity: epochs of the first (plain) model whose features weigh rows.")
]
_ClsStage1Loss = Annotated[
    str, typer.Option(help="cluster-errors, rarity: ce, or gce (a bias-amplified first model, as in LfF).")
]
_ClsClusters = Annotated[int, typer.Option(min=1, help="cluster-errors: k-means clusters per class.")]
_ClsRarityEss = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="rarity: effective sample size of the weights within each class / n.")
]
_ClsRarityK = Annotated[int, typer.Option(min=1, help="rarity: neighbours of the kNN density.")]
_ClsRarityDims = Annotated[
    int, typer.Option(min=1, help="cluster-errors, rarity: leading principal axes of the first model's features.")
]
_ClsWeightedSelection = Annotated[
    bool,
    typer.Option(
        help="cluster-errors, rarity, oracle: keep the epoch with the best validation accuracy weighted by the "
        "method's own sampling weights (label-free); --no-weighted-selection uses plain validation accuracy."
    ),
]
_ClsVaeWeight = Annotated[
    float, typer.Option(min=0.0, help="dbvae: weight of the VAE loss next to the classifier's cross-entropy.")
]


def _jtt_upweight(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise DebiasError(f"--jtt-upweight must be 'auto' or a number >= 1, got {value!r}") from None


def _classifier_job(out: Path, method: str, seed: int, opts: dict) -> object:
    """A ClassifierJob from the options train-classifier and compare share."""
    from debias.density.rarity import DensityOptions
    from debias.pipelines.train_classifier import ClassifierJob
    from debias.training.classifier import ClassifierTrainConfig

    groups = opts["eval_groups"]
    return ClassifierJob(
        data=opts["data"],
        label=opts["label"],
        out=out,
        method=method,
        where=opts["where"] or [],
        eval_where=opts["eval_where"] or [],
        eval_groups=[c.strip() for c in groups.split(",") if c.strip()] if groups else [],
        subsample=opts["subsample"] or [],
        image_size=opts["image_size"],
        latent_dim=opts["latent_dim"],
        beta=opts["beta"],
        width=opts["width"],
        train=ClassifierTrainConfig(
            epochs=opts["epochs"],
            batch_size=opts["batch_size"],
            lr=opts["lr"],
            seed=seed,
            device=opts["device"],
            select=opts["select"],
            vae_weight=opts["vae_weight"],
        ),
        val_fraction=opts["val_fraction"],
        density=DensityOptions(
            bins=opts["bins"],
            alpha=opts["alpha"],
            combine=opts["combine"],
            temperature=_temperature(opts["temperature"]),
            target_ess=opts["target_ess"],
            dims=opts["dims"],
            whiten=opts["whiten"],
        ),
        warmup_epochs=opts["warmup_epochs"],
        per_class=opts["per_class"],
        weights=opts["weights"],
        jtt_epochs=opts["jtt_epochs"],
        jtt_upweight=_jtt_upweight(opts["jtt_upweight"]),
        stage1_epochs=opts["stage1_epochs"],
        stage1_loss=opts["stage1_loss"],
        clusters=opts["clusters"],
        rarity_ess=opts["rarity_ess"],
        rarity_k=opts["rarity_k"],
        rarity_dims=opts["rarity_dims"],
        weighted_selection=opts["weighted_selection"],
        oracle_groups=[],
        resume=opts.get("resume", False),
        progress=not opts["quiet"],
    )


@app.command("train-classifier")
def train_classifier(
    data: DataOpt,
    label: _LabelOpt,
    out: _ClsOut,
    reweight: Annotated[
        str,
        typer.Option(
            "--reweight",
            help="cluster-errors (default: a first model's error rate per cluster / cluster density), rarity "
            "(inverse density in a first model's features), none (ERM), dbvae (DB-VAE Algorithm 1), two-stage "
            "(--weights) or jtt.",
        ),
    ] = "cluster-errors",
    where: WhereOpt = None,
    eval_where: _EvalWhereOpt = None,
    eval_groups: _EvalGroupsOpt = None,
    subsample: _SubsampleOpt = None,
    weights: _ClsWeights = None,
    epochs: _ClsEpochs = 10,
    image_size: _ClsImageSize = 64,
    latent_dim: _ClsLatent = 32,
    width: _ClsWidth = 32,
    beta: _ClsBeta = 1.0,
    vae_weight: _ClsVaeWeight = 0.001,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    val_fraction: _ClsValFraction = 0.1,
    select: _ClsSelect = "best",
    bins: _ClsBins = 10,
    alpha: _ClsAlpha = 0.001,
    combine: _ClsCombine = "product",
    temperature: _ClsTemperature = "auto",
    target_ess: _ClsTargetEss = 0.5,
    warmup_epochs: _ClsWarmup = 0,
    dims: _ClsDims = "all",
    whiten: _ClsWhiten = True,
    per_class: _ClsPerClass = False,
    jtt_epochs: _ClsJttEpochs = 2,
    jtt_upweight: _ClsJttUp = "auto",
    stage1_epochs: _ClsStage1Epochs = 4,
    stage1_loss: _ClsStage1Loss = "ce",
    clusters: _ClsClusters = 8,
    rarity_ess: _ClsRarityEss = 0.25,
    rarity_k: _ClsRarityK = 20,
    rarity_dims: _ClsRarityDims = 32,
    weighted_selection: _ClsWeightedSelection = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a classifier with ERM, DB-VAE adaptive resampling, audit weights or JTT; report accuracy per group."""
    from debias.pipelines.train_classifier import run_train_classifier

    opts = dict(locals())
    result = run_train_classifier(_classifier_job(out, reweight, seed, opts))
    from debias.runtime.distributed import is_main_process

    if is_main_process():  # under torchrun: once, from rank 0
        typer.echo(f"outputs in {result.out}")


# -- compare (issue 3) -------------------------------------------------------------------------------------------
@app.command()
def compare(
    data: DataOpt,
    label: _LabelOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for runs/, comparison.md/.json and groups_*.png.")],
    methods: Annotated[str, typer.Option(help="Comma-separated --reweight methods.")] = "none,cluster-errors,jtt",
    oracle_groups: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated group columns for the oracle reference: group-balanced sampling that reads them, "
            "run beside the methods (and ERM) to show the ceiling; each method then reports the share of the "
            "ERM->oracle worst-group gap it closes. A reference, never a method."
        ),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds, e.g. 0,1,2,3,4.")] = "0,1,2,3,4",
    where: WhereOpt = None,
    eval_where: _EvalWhereOpt = None,
    eval_groups: _EvalGroupsOpt = None,
    subsample: _SubsampleOpt = None,
    weights: _ClsWeights = None,
    epochs: _ClsEpochs = 10,
    image_size: _ClsImageSize = 64,
    latent_dim: _ClsLatent = 32,
    width: _ClsWidth = 32,
    beta: _ClsBeta = 1.0,
    vae_weight: _ClsVaeWeight = 0.001,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    val_fraction: _ClsValFraction = 0.1,
    select: _ClsSelect = "best",
    bins: _ClsBins = 10,
    alpha: _ClsAlpha = 0.001,
    combine: _ClsCombine = "product",
    temperature: _ClsTemperature = "auto",
    target_ess: _ClsTargetEss = 0.5,
    warmup_epochs: _ClsWarmup = 0,
    dims: _ClsDims = "all",
    whiten: _ClsWhiten = True,
    per_class: _ClsPerClass = False,
    jtt_epochs: _ClsJttEpochs = 2,
    jtt_upweight: _ClsJttUp = "auto",
    stage1_epochs: _ClsStage1Epochs = 4,
    stage1_loss: _ClsStage1Loss = "ce",
    clusters: _ClsClusters = 8,
    rarity_ess: _ClsRarityEss = 0.25,
    rarity_k: _ClsRarityK = 20,
    rarity_dims: _ClsRarityDims = 32,
    weighted_selection: _ClsWeightedSelection = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Run several methods x seeds with identical options and write a side-by-side table and per-group charts."""
    from debias.pipelines.compare import CompareJob, run_compare

    opts = dict(locals())
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise DebiasError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    base = _classifier_job(out, method_list[0] if method_list else "none", 0, opts)
    oracle = [c.strip() for c in oracle_groups.split(",") if c.strip()] if oracle_groups else []
    result = run_compare(
        CompareJob(base=base, out=out, methods=method_list, seeds=seed_list, oracle_groups=oracle, progress=not quiet)
    )
    typer.echo(result.markdown)
    typer.echo(f"outputs in {result.out}")


FitDataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--fit-data",
        help="In-distribution images to fit the novelty scorer and its calibration on when RUN_DIR/novelty.pt is "
        "missing or stale (default: the model's training data). Giving it refits.",
    ),
]
FitWhereOpt = Annotated[Optional[list[str]], typer.Option("--fit-where", help="COL=VALUE filter for --fit-data.")]
TargetFprOpt = Annotated[
    Optional[float],
    typer.Option("--target-fpr", min=0.0, max=1.0, help="False-positive rate for is_novel (default: stored, 0.05)."),
]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, max=64, help="Unusual latent dimensions listed per image.")]


@app.command()
def score(
    model: Annotated[Path, typer.Option("--model", help="Run directory written by 'debias train'.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for scores.parquet/.csv and summary.json.")],
    where: WhereOpt = None,
    fit_data: FitDataOpt = None,
    fit_where: FitWhereOpt = None,
    refit: Annotated[bool, typer.Option(help="Fit the novelty scorer again even if RUN_DIR/novelty.pt fits.")] = False,
    target_fpr: TargetFprOpt = None,
    top_k: TopKOpt = 5,
    heatmaps: Annotated[int, typer.Option(min=0, help="Write error heatmaps of the K most novel images.")] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    quiet: QuietOpt = False,
) -> None:
    """Score every image for novelty against the model's training data: p-values, is_novel, unusual dimensions."""
    from debias.pipelines.score import ScoreJob, run_score

    if target_fpr is not None and not 0 < target_fpr < 1:
        raise DebiasError(f"--target-fpr must be between 0 and 1 (exclusive), got {target_fpr}")
    job = ScoreJob(
        model=model, data=data, out=out, where=where or [], fit_data=fit_data, fit_where=fit_where or [],
        refit=refit, target_fpr=target_fpr, top_k=top_k, heatmaps=heatmaps, device=device, batch_size=batch_size,
        progress=not quiet,
    )
    result = run_score(job)
    s = result.summary
    typer.echo(
        f"scored {s['n_images']} images ({s['n_skipped']} skipped): {s['n_novel']} novel ({s['fraction_novel']:.1%} "
        f"at a target false-positive rate of {s['detector']['target_fpr']:g}); outputs in {result.out}"
    )


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", help="Run directory written by 'debias train'.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    max_batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Images per model batch (default 64; 1 turns batching off).")
    ] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(min=0.0, help="Wait for more images (default 2).")] = None,
    fit_data: FitDataOpt = None,
    fit_where: FitWhereOpt = None,
    target_fpr: TargetFprOpt = None,
    audit: Annotated[
        Optional[Path], typer.Option("--audit", help="Folder written by 'debias audit': browse it at /audit.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    engine: Annotated[str, typer.Option(help="local (uvicorn) or ray (Ray Serve; pip install debias[ray]).")] = "local",
    workers: Annotated[
        int, typer.Option(min=1, help="local: processes behind the port, each with its own model copy; metrics and "
                          "drift are per worker.")
    ] = 1,
    replicas: Annotated[int, typer.Option(min=1, help="Ray: copies of the model behind Serve's proxy.")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(min=0.0, help="Ray: GPUs per replica (fractions share one).")] = 0.0,
    address: Annotated[Optional[str], typer.Option(help="Ray: cluster address (default: start a local Ray).")] = None,
) -> None:
    """Serve novelty scoring over HTTP (POST /v1/score); API key from DEBIAS_API_KEY, limits from DEBIAS_* ."""
    from debias.pipelines.serve import run_serve

    if target_fpr is not None and not 0 < target_fpr < 1:
        raise DebiasError(f"--target-fpr must be between 0 and 1 (exclusive), got {target_fpr}")
    if engine not in ("local", "ray"):
        raise DebiasError(f"--engine must be local or ray, got {engine!r}")
    if workers > 1 and engine != "local":
        raise DebiasError("--workers is an option of --engine local (Ray scales with --replicas)")
    if engine == "ray":
        from debias.pipelines.ray_serve import run_ray_serve

        return run_ray_serve(
            host, port, replicas=replicas, gpus_per_replica=gpus_per_replica, address=address, model_dir=model,
            device=device, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, fit_data=fit_data,
            fit_where=fit_where or None, target_fpr=target_fpr, audit_dir=audit,
        )
    run_serve(
        host, port, log_level, workers=workers, model_dir=model, device=device, precision=precision,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, fit_data=fit_data, fit_where=fit_where or None, target_fpr=target_fpr,
        audit_dir=audit,
    )


@app.command()
def quality(
    real: Annotated[str, typer.Option("--real", help="SOURCE of the real images (as --data elsewhere).")],
    synthetic: Annotated[
        Path, typer.Option("--synthetic", help="Output folder of 'debias augment' (manifest.csv + images).")
    ],
    features: Annotated[
        Path, typer.Option("--features", help="Run directory of 'debias train' on the real data: the feature model.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for quality.json and quality.html.")],
    real_where: Annotated[
        Optional[list[str]], typer.Option("--real-where", help="Keep real rows where COL=VALUE (repeatable).")
    ] = None,
    group_by: Annotated[Optional[str], typer.Option(help="Column in both sets: metrics per group.")] = None,
    label: Annotated[
        Optional[str], typer.Option(help="Label column in both sets: classification accuracy score.")
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="Nearest neighbours for precision / recall.")] = 3,
    kid_subset_size: Annotated[
        int, typer.Option(min=2, help="KID images per subset (at most; shrunk to fit small groups).")
    ] = 1000,
    kid_subsets: Annotated[int, typer.Option(min=1, help="KID random subsets.")] = 100,
    cas_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the CAS classifier.")] = 10,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    seed: int = 0,
    quiet: QuietOpt = False,
) -> None:
    """Quality of generated images against real ones: FID, KID, precision/recall per group, CAS; an HTML page."""
    from debias.evaluation.generation_metrics import CasConfig
    from debias.pipelines.synthetic_quality import QualityJob, format_table, run_quality

    job = QualityJob(
        real=real, synthetic=synthetic, features=features, out=out, real_where=real_where or [], group_by=group_by,
        label=label, k=k, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
        cas=CasConfig(epochs=cas_epochs, seed=seed, device=device), device=device, seed=seed, progress=not quiet,
    )
    result = run_quality(job)
    typer.echo(format_table(result["metrics"]))
    for method, cas in result["cas"].items():
        acc = cas["accuracy"]
        typer.echo(f"CAS ({method}): " + (f"accuracy {acc:.3f} on real images" if acc is not None else cas["reason"]))
    typer.echo(f"outputs in {out} (quality.json, quality.html)")


# -- augment (issue 5) ------------------------------------------------------------------------------------------
@app.command()
def augment(
    method: Annotated[str, typer.Option("--method", help="gan (rarity-weighted generation) or cyclegan (translation).")],
    data: DataOpt,
    # --n-images: under torchrun, argparse's prefix matching reads a bare --n as an ambiguous torchrun option.
    n: Annotated[int, typer.Option("--n", "--n-images", min=1, help="Synthetic images to write.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for images/, manifest.csv, the training run and samples/.")],
    where: WhereOpt = None,
    weights: Annotated[
        Optional[Path], typer.Option("--weights", help="An audit's scores.parquet: rarity weights (joined on path).")
    ] = None,
    model: Annotated[
        Optional[Path], typer.Option("--model", help="A VAE run directory: compute the rarity weights from it.")
    ] = None,
    label: Annotated[
        Optional[str], typer.Option("--label", help="gan: condition on this column; cyclegan: carry it over.")
    ] = None,
    domain_column: Annotated[
        Optional[str], typer.Option("--domain-column", help="cyclegan: the column whose values --from/--to name.")
    ] = None,
    from_: Annotated[
        Optional[str], typer.Option("--from", help="cyclegan: domain to translate from (or 'common' with --weights).")
    ] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="cyclegan: domain to translate into (or 'rare').")] = None,
    rare_quantile: Annotated[
        float, typer.Option(help="cyclegan --from common --to rare: share of the rarest rows that form 'rare'.")
    ] = 0.1,
    epochs: Annotated[
        int, typer.Option(min=1, help="gan: an epoch draws as many images as the data has (by rarity); cyclegan: "
                          "max(|A|, |B|) pairs, the larger domain once and the smaller in repeated passes.")
    ] = 20,
    image_size: Annotated[int, typer.Option(min=28, max=128)] = 64,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Default: 64 (gan), 8 (cyclegan).")] = None,
    width: Annotated[int, typer.Option(min=4, help="Channels of the full-resolution layers (doubled per halving).")] = 32,
    z_dim: Annotated[int, typer.Option(min=1, help="gan: noise dimensions.")] = 128,
    n_blocks: Annotated[
        Optional[int], typer.Option(min=0, help="cyclegan: residual blocks of the generator (default: 3 below 128 px, "
                                    "6 at 128 px, as the reference's 6 at 128 and 9 at 256).")
    ] = None,
    max_steps: Annotated[
        Optional[int], typer.Option(min=1, help="End training after this many steps (a budget; the run is saved).")
    ] = None,
    max_minutes: Annotated[
        Optional[float], typer.Option(min=0.01, help="End training after this many minutes (saved; --resume continues).")
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-4,
    ema_decay: Annotated[float, typer.Option(min=0.0, max=1.0, help="gan: EMA decay of the generator copy.")] = 0.999,
    d_lr: Annotated[
        Optional[float], typer.Option(min=0.0, help="gan: the discriminator's learning rate (default: --lr).")
    ] = None,
    diffaugment: Annotated[bool, typer.Option(help="gan: DiffAugment (colour, translation, cutout).")] = True,
    balanced_labels: Annotated[
        bool, typer.Option(help="gan --label: generate classes equally often (default: the weighted label mix).")
    ] = False,
    merge_with: Annotated[
        Optional[Path],
        typer.Option("--merge-with", help="Original manifest: also write OUT/combined.csv (both, absolute paths)."),
    ] = None,
    features: Annotated[
        Optional[Path],
        typer.Option(help="A VAE run on the same data: also measure FID/KID, precision/recall, CAS (OUT/quality/)."),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue the training run in --out from its last checkpoint.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Add synthetic rare samples: a rarity-weighted (conditional) GAN, or CycleGAN translation from common to rare."""
    from debias.pipelines.augment import (
        AugmentJob,
        CycleGANOptions,
        GANOptions,
        run_augment,
    )

    if method not in ("gan", "cyclegan"):
        raise DebiasError(f"--method must be gan or cyclegan, got {method!r}")
    job = AugmentJob(
        method=method, data=data, out=out, n=n, where=where or [], weights=weights, model=model, label=label,
        image_size=image_size, epochs=epochs, batch_size=batch_size, max_steps=max_steps, max_minutes=max_minutes,
        lr=lr, seed=seed, device=device,
        gan=GANOptions(z_dim=z_dim, width=width, ema_decay=ema_decay, d_lr=d_lr, diffaugment=diffaugment,
                       balanced_labels=balanced_labels),
        cyclegan=CycleGANOptions(domain_column=domain_column, source=from_, target=to, rare_quantile=rare_quantile,
                                 width=width, n_blocks=n_blocks),
        merge_with=merge_with, features=features, resume=resume, progress=not quiet,
    )
    result = run_augment(job)
    if result.is_main:
        typer.echo(f"wrote {result.n_images} {method} images and {result.manifest}"
                   + (f" and {result.combined}" if result.combined else ""))
        if result.quality is not None:
            typer.echo(f"quality: {result.quality}")


# -- commands of later issues are added above this line, one block per command ----------------------------------


def main() -> None:
    try:
        app(prog_name="debias")
    except DebiasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
