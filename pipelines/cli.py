"""The `debias` command line (also `python -m debias`).

The end-to-end jobs live in `pipelines/`; each command imports its job lazily so that `debias --help` stays fast and
the library never imports the pipelines at module level.

Conventions, the same for every command:

- **Choices are Enums** (``--device``, ``--precision``, ``--engine``, ``--estimator``, ``--combine``, ``--dims``,
  ``--select``, ``--stage1-loss``, ``--stage1-encoder``, ``--method``, ``--log-level``): ``--help`` lists the allowed values and any other
  value is refused with a one-line ``error: --OPTION must be one of ..., got '...'`` and exit code 2. The values
  repeat the library's constants (``PRECISIONS``, ``RARITY_ESTIMATORS``, ``train_classifier.METHODS``, ...) so that
  this module does not import torch for ``--help``; tests/test_cli.py checks that they agree. The command receives
  the plain string (``"cpu"``, not ``Device.cpu``), as the jobs and the stored configs expect.
- **List options** (``--where``, ``--eval-where``, ``--fit-where``, ``--real-where``, ``--subsample``,
  ``--group-by`` of audit, ``--eval-groups``, ``--oracle-groups``, ``--reweight``/``--methods``,
  ``--seeds``/``--seed``) are repeatable, and each occurrence may also hold several comma-separated items:
  ``--eval-groups race,gender`` = ``--eval-groups race --eval-groups gender``. One parser (:func:`split_list`) reads
  them all. In ``COL=VALUE`` lists a comma starts a new item only when what follows is itself ``COL=...``, so
  ``--where split=train,colour=red`` is two filters while ``--where name=Smith, J.`` keeps its comma.
- Errors in the input, from the jobs (:class:`debias.errors.DebiasError`) or from the parser (unknown choice,
  missing option, value out of range), are one line on stderr and exit code 2.
- ``debias --version`` prints ``debias VERSION``.

``train-classifier`` trains one classifier, or, given several ``--reweight`` methods and/or several ``--seeds``
(or ``--oracle-groups``), runs each method x seed with the same options and writes the side-by-side comparison
(pipelines/compare.py). ``compare`` is an alias of it that always writes the comparison and defaults to
``--reweight none,auto,jtt --seeds 0,1,2,3,4``: both are one function with one set of options.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from debias.errors import DebiasError
from debias.runtime.allocator import retain_freed_memory

app = typer.Typer(
    help="Find what an image dataset is missing, reweight training towards it, and flag novel inputs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# -- choices ------------------------------------------------------------------------------------------------------
# The values repeat library constants (named on each class) so that `debias --help` does not import torch;
# tests/test_cli.py::test_choice_enums_match_the_library checks that they agree.
class Device(str, Enum):
    """debias.runtime.device.resolve_device"""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    """debias.runtime.device.PRECISIONS"""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Estimator(str, Enum):
    """debias.density.rarity.RARITY_ESTIMATORS"""

    knn_recon = "knn-recon"
    knn = "knn"
    histogram = "histogram"
    histogram_max = "histogram-max"
    gmm = "gmm"
    recon = "recon"


class Combine(str, Enum):
    """debias.density.rarity.DensityOptions.combine"""

    product = "product"
    max = "max"


class Dims(str, Enum):
    """debias.density.rarity.DensityOptions.dims"""

    all = "all"
    active = "active"


class Select(str, Enum):
    """debias.training.classifier.ClassifierTrainConfig.select"""

    best = "best"
    last = "last"


class Stage1Encoder(str, Enum):
    """The first model's encoder: debias.models.vae.ENCODERS."""

    conv = "conv"
    local = "local"


class Stage1Loss(str, Enum):
    """The first model's objective: debias.training.classifier.OBJECTIVES less dbvae."""

    ce = "ce"
    gce = "gce"


class Method(str, Enum):
    """--reweight: debias.pipelines.train_classifier.METHODS"""

    auto = "auto"
    cluster_errors = "cluster-errors"
    lff = "lff"
    rarity = "rarity"
    none = "none"
    dbvae = "dbvae"
    two_stage = "two-stage"
    jtt = "jtt"


class AugmentMethod(str, Enum):
    """debias.pipelines.augment.METHODS"""

    gan = "gan"
    cyclegan = "cyclegan"


class LogLevel(str, Enum):
    """uvicorn's log levels"""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


def _values(enum: type[Enum]) -> list[str]:
    return [m.value for m in enum]


def _plain(value: Any) -> Any:
    """Option callback: hand the command an Enum's plain string value ("cpu", not Device.cpu)."""
    return value.value if isinstance(value, Enum) else value


# The ray extra's real install command. The distribution (debias-vision) is not on PyPI: it is installed from a clone.
# "\[" keeps rich's markup in --help from reading "[ray]" as a style tag and dropping it.
RAY_INSTALL = 'pip install -e ".\\[ray]" in a clone of the repository'


# -- list options: one convention -----------------------------------------------------------------------------------
def split_list(values: Optional[list[str]], *, pairs: bool = False) -> list[str]:
    """The items of a list option: every occurrence of the option, each split at commas, stripped, empty items
    dropped, in order. ``pairs``: COL=VALUE items, where a comma starts a new item only if the next part has an '='
    (``a=1,b=2`` -> two items, ``name=Smith, J.`` -> one)."""
    items: list[str] = []
    for value in values or []:
        parts = str(value).split(",")
        if pairs:
            merged: list[str] = []
            for part in parts:
                if not part.strip():
                    continue
                if merged and "=" not in part:
                    merged[-1] += "," + part
                else:
                    merged.append(part)
            parts = merged
        items += [p.strip() for p in parts if p.strip()]
    return items


def _columns(values: Optional[list[str]]) -> list[str]:
    return split_list(values)


def _pairs(values: Optional[list[str]]) -> list[str]:
    return split_list(values, pairs=True)


def _unique(items: list[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _methods(values: Optional[list[str]]) -> list[str]:
    items = _unique(split_list(values))
    allowed = _values(Method)
    for m in items:
        if m not in allowed:
            raise DebiasError(f"--reweight must be one of {', '.join(allowed)}, got {m!r}")
    if not items:
        raise DebiasError(f"--reweight needs at least one of {', '.join(allowed)}")
    return items


def _seeds(values: Optional[list[str]]) -> list[int]:
    items = split_list(values)
    try:
        seeds = _unique([int(s) for s in items])
    except ValueError:
        raise DebiasError(f"--seeds must be integers (repeatable or comma-separated), got {','.join(items)!r}") from None
    if not seeds:
        raise DebiasError("--seeds needs at least one seed")
    return seeds


_PAIRS = "repeatable or comma-separated"

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Image folder, CSV/Parquet manifest with a 'path' column, folder of MNIST idx files, or builtin:NAME.",
    ),
]
WhereOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--where", callback=_pairs, metavar="COL=VALUE",
        help=f"Keep rows where COL=VALUE ({_PAIRS}; same column: any of, columns: all of).",
    ),
]
def _device(value: Any) -> str:
    """--device: one of Device, or cuda:N for one GPU of several (not an Enum value, so checked here)."""
    value = _plain(value)
    if value in {d.value for d in Device} or re.fullmatch(r"cuda:\d+", value or ""):
        return value
    raise DebiasError(f"--device must be one of auto, cpu, cuda, cuda:N, got {value!r} (see 'debias --help')")


DeviceOpt = Annotated[
    str, typer.Option("--device", callback=_device, metavar="[auto|cpu|cuda|cuda:N]",
                      help="auto (cuda if available), cpu, cuda, or cuda:N.")
]


def _apply_precision(value: Precision) -> str:
    from debias.runtime.device import set_precision

    value = _plain(value)
    set_precision(value)  # for the whole process: every forward pass of this command
    return value


PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision", callback=_apply_precision,
        help="auto (bf16 on CPUs with AMX or AVX-512-BF16, but not for classifier training; fp32 elsewhere, CUDA "
        "included: faster there at these model sizes), fp32 or bf16.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _version(value: bool) -> None:
    if value:
        from debias import __version__

        typer.echo(f"debias {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Find what an image dataset is missing, reweight training towards it, and flag novel inputs."""


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
    precision: PrecisionOpt = Precision.auto,
    seed: int = 0,
    calibration_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Share of the images held out of training, on which `debias "
                            "score` and the service calibrate the novelty p-values (0 = train on all).")
    ] = 0.2,
    contrastive_epochs: Annotated[
        int, typer.Option(min=0, help="Epochs of the contrastive encoder trained after the VAE on the same images: "
                          "its kNN distance joins the novelty score and catches near-distribution images the VAE "
                          "cannot tell apart (0 = no encoder; the novelty score then uses the VAE alone).")
    ] = 15,
    contrastive_min_steps: Annotated[
        int, typer.Option(min=0, help="...and at least this many steps of 256 images: small sets get more epochs "
                          "(2,000 images: 86 epochs, about 2 min on 2 cores). 0 = exactly --contrastive-epochs.")
    ] = 600,
    contrastive_labels: Annotated[
        bool, typer.Option(help="Train the contrastive encoder with --label (supervised contrastive, SupCon): every "
                           "image of a class is a partner. Sees images of a class the training set lacks better "
                           "(a held-out shirt among garments: AUROC 0.64 -> 0.80), but gathers each class, which "
                           "hides the subgroups inside a class from the audit. Needs --label.")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a beta-VAE (or a DB-VAE when --label is given) on a data source, and the novelty score's contrastive
    encoder on the same images."""
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
        calibration_fraction=calibration_fraction,
        contrastive_epochs=contrastive_epochs,
        contrastive_min_steps=contrastive_min_steps,
        contrastive_labels=contrastive_labels,
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



def _print_group_tables(groups: dict[str, Any]) -> None:
    """The audit's per-group tables in the terminal, sorted by weight ratio (nothing without --group-by)."""
    if not groups:
        return
    from rich.console import Console

    from debias.pipelines.audit import group_table

    for name, table in groups.items():
        Console().print(group_table(name, table))


@app.command()
def audit(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for scores.parquet/.csv, summary.json, report.html.")],
    where: WhereOpt = None,
    group_by: Annotated[
        Optional[list[str]],
        typer.Option(callback=_columns, metavar="COL", help=f"Columns for per-group statistics ({_PAIRS})."),
    ] = None,
    estimator: Annotated[
        Estimator, typer.Option(callback=_plain, help="Rarity: knn-recon (kNN latent density + reconstruction "
                                "error + the contrastive encoder's kNN rarity when the run has one; see --encoder), knn, "
                                "histogram (paper Eq. 3-4), histogram-max (lab), gmm, recon.")
    ] = Estimator.knn_recon,
    n_neighbors: Annotated[int, typer.Option(min=1, help="knn, knn-recon: neighbours of the kNN density.")] = 5,
    encoder: Annotated[
        bool, typer.Option(help="knn-recon: add the kNN rarity of the run's contrastive encoder features (when "
                           "the run has one; the local engine).")
    ] = True,
    bins: Annotated[int, typer.Option(min=1, help="Histogram bins per latent dimension.")] = 10,
    alpha: Annotated[float, typer.Option(min=0.0, help="Smoothing added to each bin probability.")] = 0.001,
    combine: Annotated[
        Combine, typer.Option(callback=_plain, help="product (paper Eq. 3-4) or max (public lab).")
    ] = Combine.product,
    temperature: Annotated[str, typer.Option(help="'auto' or a number T: weights ∝ exp(T · rarity).")] = "auto",
    target_ess: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="With --temperature auto: effective sample size / n.")
    ] = 0.5,
    dims: Annotated[
        Dims, typer.Option(callback=_plain, help="all, or active (skip collapsed latent dimensions).")
    ] = Dims.all,
    whiten: Annotated[bool, typer.Option(help="Rotate latents onto principal axes before the histograms.")] = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    report: Annotated[bool, typer.Option(help="Write report.html.")] = True,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Then serve the model and this audit, print the URL of /audit, open it.")
    ] = False,
    engine: Annotated[
        Engine, typer.Option(callback=_plain, help=f"local, or ray: decode + encode as a Ray Data job (needs the ray "
                             f"extra: {RAY_INSTALL}).")
    ] = Engine.local,
    address: Annotated[Optional[str], typer.Option(help="Ray engines: cluster address (default: start a local Ray).")] = None,
    actors: Annotated[Optional[int], typer.Option(min=1, help="Ray: encoder actors (default: one per GPU, else per CPU).")] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(min=0.0, help="Ray: GPUs per actor (default: 1 if the cluster has GPUs).")] = None,
    quiet: QuietOpt = False,
    model: Annotated[
        Optional[Path], typer.Option("--model", help="Run directory written by 'debias train' (or --embeddings).")
    ] = None,
    embeddings: Annotated[
        Optional[Path], typer.Option("--embeddings", help="Parquet/CSV of precomputed embeddings keyed by 'path' "
                                     "(a column 'embedding' or numeric columns): audit them instead of a model's "
                                     "latents; no --model, no report.html.")
    ] = None,
) -> None:
    """Score every sample for rarity and write scores, a summary and an HTML report."""
    from debias.density.rarity import DensityOptions
    from debias.pipelines.audit import AuditJob, run_audit

    if (model is None) == (embeddings is None):
        raise DebiasError("give --model RUN_DIR (a trained model) or --embeddings FILE, one of the two")
    if embeddings is not None and (engine == "ray" or open_browser):
        raise DebiasError("--embeddings runs on the local engine and writes no report to --open")

    job = AuditJob(
        model=model,
        data=data,
        out=out,
        where=where or [],
        group_by=group_by or [],
        estimator=estimator,
        n_neighbors=n_neighbors,
        use_encoder=encoder,
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
    if embeddings is not None:
        from debias.pipelines.audit import run_embeddings_audit

        result = run_embeddings_audit(job, embeddings)
        s = result.summary
        _print_group_tables(s["groups"])
        typer.echo(
            f"audited {s['n_scored']} embeddings ({s['n_without_embedding']} rows without one) with "
            f"{s['rarity_estimator']} rarity; effective sample size {s['effective_sample_size']:.0f} "
            f"({s['effective_sample_fraction']:.0%}); outputs in {result.out}"
        )
        return
    if engine == "ray":
        from debias.pipelines.ray_audit import RayAuditOptions, run_ray_audit

        result = run_ray_audit(job, RayAuditOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor))
    else:
        result = run_audit(job)
    s = result.summary
    _print_group_tables(s["groups"])
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
    precision: PrecisionOpt = Precision.auto,
    quiet: QuietOpt = False,
) -> None:
    """Train and audit on the built-in shapes dataset and show that its rare group was found."""
    from debias.pipelines.demo import run_demo

    run_demo(out=out, epochs=epochs, n=n, device=device, progress=not quiet)


# -- train-classifier (issue 3), and compare as its alias -------------------------------------------------------------
_ClsOut = Annotated[
    Path,
    typer.Option(
        "--out",
        help="Run directory: predictions.csv, metrics.json, classifier.pt. With several methods or seeds: runs/"
        "METHOD/seedS/ (one such run each), comparison.md/.json and groups_*.png.",
    ),
]
_LabelOpt = Annotated[str, typer.Option("--label", help="Column to predict (binary or multi-class; strings or integers).")]
_ReweightOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--reweight", "--methods", callback=_methods, metavar="METHOD",
        help="How each epoch's rows are drawn, one of: auto (default: lff when a bias-amplified first model's losses "
        "concentrate on few rows, else cluster-errors), cluster-errors (a first model's error rate per cluster / "
        "cluster density), lff (Learning from Failure's relative difficulty), rarity (inverse density in a first "
        f"model's features), none (ERM), dbvae (DB-VAE Algorithm 1), two-stage (--weights) or jtt. Several ({_PAIRS}; "
        "--methods is the same option): one run per method x seed and a side-by-side comparison.",
    ),
]
_SeedsOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--seeds", "--seed", callback=_seeds, metavar="INT",
        help=f"Seed, or several ({_PAIRS}, e.g. 0,1,2,3,4): one run per method x seed and a comparison.",
    ),
]
_OracleOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--oracle-groups", callback=_columns, metavar="COL",
        help=f"Group columns ({_PAIRS}) for the oracle reference: group-balanced sampling that reads them, run beside "
        "the methods (and ERM) to show the ceiling; each method then reports the share of the ERM->oracle "
        "worst-group gap it closes. A reference, never a method. Makes the run a comparison.",
    ),
]
_EvalWhereOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--eval-where", callback=_pairs, metavar="COL=VALUE",
        help=f"Evaluation rows, COL=VALUE ({_PAIRS}). Default: the validation rows.",
    ),
]
_EvalGroupsOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--eval-groups", callback=_columns, metavar="COL",
        help=f"Columns for per-group accuracy ({_PAIRS}). Used only for evaluation.",
    ),
]
_SubsampleOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--subsample", callback=_pairs, metavar="COL=VALUE:FRACTION",
        help=f"Keep that fraction of the training rows with COL=VALUE ({_PAIRS}).",
    ),
]
_ClsEpochs = Annotated[int, typer.Option(min=1, help="Training epochs (JTT: of its second training).")]
_ClsImageSize = Annotated[int, typer.Option(min=28, max=128)]
_ClsLatent = Annotated[int, typer.Option(min=1, help="Latent dimensions of the (DB-)VAE encoder.")]
_ClsWidth = Annotated[int, typer.Option(min=4, help="Channels of the first convolution.")]
_ClsBeta = Annotated[float, typer.Option(min=0.0, help="dbvae: weight of the KL term.")]
_ClsValFraction = Annotated[
    float, typer.Option(min=0.0, max=0.9, help="Share of the training rows held out to select the epoch.")
]
_ClsSelect = Annotated[Select, typer.Option(callback=_plain, help="best (validation accuracy) or last epoch.")]
_ClsBins = Annotated[int, typer.Option(min=1, help="dbvae: histogram bins per latent dimension.")]
_ClsAlpha = Annotated[float, typer.Option(min=0.0, help="dbvae: smoothing alpha of Eq. 4 (smaller debiases more).")]
_ClsTemperature = Annotated[str, typer.Option(help="dbvae: 'auto' or a number scaling the log-weights.")]
_ClsCombine = Annotated[
    Combine, typer.Option(callback=_plain, help="dbvae: product (paper Eq. 3-4) or max (public lab) over dimensions.")
]
_ClsTargetEss = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="dbvae, --temperature auto: effective sample size / n.")
]
_ClsWarmup = Annotated[int, typer.Option(min=0, help="dbvae: epochs of uniform sampling before the weights.")]
_ClsDims = Annotated[
    Dims, typer.Option(callback=_plain, help="dbvae: all, or active (leading principal axes / non-collapsed dims).")
]
_ClsWhiten = Annotated[bool, typer.Option(help="dbvae: histograms on the latents' principal axes.")]
_ClsPerClass = Annotated[bool, typer.Option(help="dbvae: fit one latent density per label class.")]
_ClsWeights = Annotated[Optional[Path], typer.Option("--weights", help="two-stage: scores.parquet of an audit.")]
_ClsJttEpochs = Annotated[int, typer.Option(min=1, help="jtt: epochs of the first (ERM) training.")]
_ClsJttUp = Annotated[
    str, typer.Option(help="jtt: how many times the error set is upsampled, or auto: (1 - error rate) / error rate.")
]
_ClsStage1Epochs = Annotated[
    int, typer.Option(min=1, help="auto, cluster-errors, lff, rarity: epochs of the first model, which weighs the "
                      "rows.")
]
_ClsStage1Loss = Annotated[
    Optional[Stage1Loss],
    typer.Option(callback=_plain, help="auto, cluster-errors, lff, rarity: the first model's loss, ce or gce "
                 "(bias-amplified, as in LfF). Default: gce for auto, lff and rarity, ce for the others."),
]
_ClsStage1MaxEpochs = Annotated[
    int, typer.Option(min=1, help="auto, rarity: while the first model has not concentrated its losses (no shortcut "
                      "learned yet), train it one more epoch, up to this many.")
]
_ClsStage1Encoder = Annotated[
    Optional[Stage1Encoder],
    typer.Option(callback=_plain, help="auto, cluster-errors, lff, rarity: the first model's encoder, conv (the "
                 "classifier's own) or local (5-px receptive field: sees colour, texture and blur, not the layout). "
                 "Default: local for auto, lff and rarity, conv for cluster-errors."),
]
_ClsClusters = Annotated[int, typer.Option(min=1, help="cluster-errors: k-means clusters per class.")]
_ClsAutoGate = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="auto, rarity: reweight (auto: as lff) when the biased first model's first-epoch weights "
    "have an effective sample size of at most this fraction of the rows (a shortcut); otherwise train plainly.")]
_ClsRarityEss = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="rarity: effective sample size of the weights within each class / n.")
]
_ClsRarityK = Annotated[Optional[int], typer.Option(
    min=1, help="rarity: neighbours of the kNN density. Default: 5 % of each class's rows (at least 20), so that a "
    "group up to about that size reads as sparse.")]
_ClsRarityDims = Annotated[
    int, typer.Option(min=1, help="cluster-errors (and auto's), rarity: leading principal axes of the first model's "
                      "features.")
]
_ClsRarityQuantiles = Annotated[bool, typer.Option(
    help="rarity: map each first-model feature to its quantile among all training rows before the kNN densities, so "
    "that no heavy-tailed feature decides the distances; --no-rarity-quantiles uses the features as they are.")]
_ClsWeightedSelection = Annotated[
    bool,
    typer.Option(
        help="auto, cluster-errors, lff, rarity, oracle: keep the epoch with the best validation accuracy weighted by "
        "the "
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
    """A ClassifierJob from the options of train-classifier (and of its alias compare)."""
    from debias.density.rarity import DensityOptions
    from debias.pipelines.train_classifier import ClassifierJob
    from debias.training.classifier import ClassifierTrainConfig

    return ClassifierJob(
        data=opts["data"],
        label=opts["label"],
        out=out,
        method=method,
        where=opts["where"] or [],
        eval_where=opts["eval_where"] or [],
        eval_groups=opts["eval_groups"] or [],
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
        stage1_encoder=opts["stage1_encoder"],
        stage1_max_epochs=opts["stage1_max_epochs"],
        clusters=opts["clusters"],
        auto_gate=opts["auto_gate"],
        rarity_ess=opts["rarity_ess"],
        rarity_k=opts["rarity_k"],
        rarity_dims=opts["rarity_dims"],
        rarity_quantiles=opts["rarity_quantiles"],
        weighted_selection=opts["weighted_selection"],
        oracle_groups=[],
        resume=opts["resume"],
        progress=not opts["quiet"],
    )


def _run_classifiers(opts: dict[str, Any], *, always_compare: bool) -> None:
    """train-classifier and compare: one run in --out, or (several methods or seeds, --oracle-groups, or compare)
    every method x seed in --out/runs/ and the comparison of pipelines/compare.py."""
    methods, seeds, oracle = opts["reweight"], opts["seeds"], opts["oracle_groups"] or []
    out: Path = opts["out"]
    if not always_compare and len(methods) == 1 and len(seeds) == 1 and not oracle:
        from debias.pipelines.train_classifier import run_train_classifier
        from debias.runtime.distributed import is_main_process

        result = run_train_classifier(_classifier_job(out, methods[0], seeds[0], opts))
        if is_main_process():  # under torchrun: once, from rank 0
            typer.echo(f"outputs in {result.out}")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DebiasError("several --reweight methods or --seeds (a comparison) are not data-parallel: run them as a "
                          "single process, without torchrun")
    from debias.pipelines.compare import CompareJob, run_compare

    base = _classifier_job(out, methods[0], seeds[0], opts)
    result = run_compare(
        CompareJob(base=base, out=out, methods=methods, seeds=seeds, oracle_groups=oracle, progress=not opts["quiet"])
    )
    typer.echo(result.markdown)
    typer.echo(f"outputs in {result.out}")


@app.command("train-classifier")
def train_classifier(
    data: DataOpt,
    label: _LabelOpt,
    out: _ClsOut,
    reweight: _ReweightOpt = ["auto"],  # noqa: B006 (typer copies defaults)
    seeds: _SeedsOpt = ["0"],  # noqa: B006
    oracle_groups: _OracleOpt = None,
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
    select: _ClsSelect = Select.best,
    bins: _ClsBins = 10,
    alpha: _ClsAlpha = 0.001,
    combine: _ClsCombine = Combine.product,
    temperature: _ClsTemperature = "auto",
    target_ess: _ClsTargetEss = 0.5,
    warmup_epochs: _ClsWarmup = 0,
    dims: _ClsDims = Dims.all,
    whiten: _ClsWhiten = True,
    per_class: _ClsPerClass = False,
    jtt_epochs: _ClsJttEpochs = 2,
    jtt_upweight: _ClsJttUp = "auto",
    stage1_epochs: _ClsStage1Epochs = 4,
    stage1_loss: _ClsStage1Loss = None,
    stage1_encoder: _ClsStage1Encoder = None,
    stage1_max_epochs: _ClsStage1MaxEpochs = 8,
    clusters: _ClsClusters = 8,
    auto_gate: _ClsAutoGate = 0.35,
    rarity_ess: _ClsRarityEss = 0.1,
    rarity_k: _ClsRarityK = None,
    rarity_dims: _ClsRarityDims = 32,
    rarity_quantiles: _ClsRarityQuantiles = True,
    weighted_selection: _ClsWeightedSelection = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint (a comparison always does).")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a classifier with ERM, DB-VAE adaptive resampling, audit weights or JTT; report accuracy per group.

    Several --reweight methods or --seeds (or --oracle-groups): every method x seed with the same options in
    OUT/runs/, compared side by side in OUT/comparison.md/.json and OUT/groups_*.png."""
    _run_classifiers(dict(locals()), always_compare=False)


def compare(**opts: Any) -> None:
    _run_classifiers(opts, always_compare=True)


# compare is train-classifier's function with two other defaults: the same options, defined once above.
_COMPARE_DEFAULTS = {"reweight": ["none", "auto", "jtt"], "seeds": ["0", "1", "2", "3", "4"]}
_signature = inspect.signature(train_classifier, eval_str=True)
compare.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p.replace(default=_COMPARE_DEFAULTS.get(p.name, p.default)) for p in _signature.parameters.values()]
)
app.command(
    "compare",
    help="Alias of train-classifier that always writes the comparison (runs/, comparison.md/.json, groups_*.png); "
    "defaults: --methods none,auto,jtt --seeds 0,1,2,3,4.",
)(compare)


FitDataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--fit-data",
        help="In-distribution images to fit the novelty scorer and its calibration on when RUN_DIR/novelty.pt is "
        "missing or stale (default: the model's training data). Giving it refits.",
    ),
]
FitWhereOpt = Annotated[
    Optional[list[str]],
    typer.Option("--fit-where", callback=_pairs, metavar="COL=VALUE", help=f"COL=VALUE filters for --fit-data ({_PAIRS})."),
]
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
    precision: PrecisionOpt = Precision.auto,
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
    precision: PrecisionOpt = Precision.auto,
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
    log_level: Annotated[LogLevel, typer.Option(callback=_plain, help="uvicorn log level.")] = LogLevel.info,
    engine: Annotated[
        Engine, typer.Option(callback=_plain, help=f"local (uvicorn) or ray (Ray Serve; needs the ray extra: {RAY_INSTALL}).")
    ] = Engine.local,
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
        Optional[list[str]],
        typer.Option("--real-where", callback=_pairs, metavar="COL=VALUE", help=f"Keep real rows where COL=VALUE ({_PAIRS})."),
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
    precision: PrecisionOpt = Precision.auto,
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
    method: Annotated[
        AugmentMethod,
        typer.Option("--method", callback=_plain, help="gan (rarity-weighted generation) or cyclegan (translation)."),
    ],
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
    precision: PrecisionOpt = Precision.auto,
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




def _click_exceptions() -> Any:
    """The click exception classes typer raises: its vendored copy in recent typer, click itself before."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer that depends on click
        from click import exceptions
    return exceptions


def usage_message(exc: Exception) -> str:
    """A parser error (unknown choice, missing option, bad number, unknown command) as one line."""
    message = str(getattr(exc, "message", None) or exc).replace("Value error, ", "")
    param = getattr(exc, "param", None)
    opts = [o for o in getattr(param, "opts", None) or [] if o.startswith("--")]
    choice = re.search(r"""('[^']*'|"[^"]*") is not one of (.*?)\.?$""", message)
    if choice and opts:
        allowed = ", ".join(c.strip().strip("'\"") for c in choice.group(2).split(","))
        line = f"{opts[0]} must be one of {allowed}, got {choice.group(1)}"
    else:
        line = exc.format_message() if hasattr(exc, "format_message") else message
        line = line.replace("Value error, ", "")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        line = line.rstrip(".") + f" (see '{ctx.command_path} --help')"
    return " ".join(line.split())


def main(argv: Optional[list[str]] = None) -> None:
    """The console script: runs the app with one-line errors (exit code 2) instead of click's usage panels."""
    retain_freed_memory()  # large activations reuse freed memory instead of page-faulting fresh maps every step
    errors = _click_exceptions()
    try:
        code = app(args=argv, prog_name="debias", standalone_mode=False)
    except DebiasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _leave(exc.exit_code)
    except errors.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `debias` alone: the help has been printed
            _leave(exc.exit_code)
        print(f"error: {usage_message(exc)}", file=sys.stderr)
        _leave(2)
    except errors.ClickException as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        _leave(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        _leave(130)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        print("interrupted", file=sys.stderr)
    _leave(code if isinstance(code, int) else 0)


def _leave(code: int) -> NoReturn:
    """Exit with ``code``. Under torchrun the interpreter's own shutdown is skipped: a gloo worker thread can still be
    releasing a finished collective's record (it holds Python objects) while the interpreter finalises; the thread
    then cannot take the GIL, is unwound, and the C++ runtime aborts the process (SIGABRT, "terminate called without
    an active exception") after the job has succeeded. Seen in 7 of 81 runs under load (2 jobs side by side); the
    core dump's stack ends in ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``gil_scoped_acquire``
    during ``Py_FinalizeEx``. The job has written everything by now (atomically) and left the process group, so only
    the output streams need flushing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

if __name__ == "__main__":
    main()
