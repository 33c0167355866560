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
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a beta-VAE (or a DB-VAE when --label is given) on a data source."""
    from debias.training import TrainConfig
    from pipelines.train import TrainJob, run_train

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
    bins: Annotated[int, typer.Option(min=1, help="Histogram bins per latent dimension.")] = 10,
    alpha: Annotated[float, typer.Option(min=0.0, help="Smoothing added to each bin probability.")] = 0.001,
    combine: Annotated[str, typer.Option(help="product (paper Eq. 3-4) or max (public lab).")] = "product",
    temperature: Annotated[str, typer.Option(help="'auto' or a number: scales the product's log-weights.")] = "auto",
    target_ess: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="With --temperature auto: effective sample size / n.")
    ] = 0.5,
    dims: Annotated[str, typer.Option(help="all, or active (skip collapsed latent dimensions).")] = "all",
    whiten: Annotated[bool, typer.Option(help="Rotate latents onto principal axes before the histograms.")] = False,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    report: Annotated[bool, typer.Option(help="Write report.html.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Score every sample for rarity and write scores, a summary and an HTML report."""
    from pipelines.audit import AuditJob, DensityOptions, run_audit

    if combine not in ("product", "max"):
        raise DebiasError(f"--combine must be product or max, got {combine!r}")
    if dims not in ("all", "active"):
        raise DebiasError(f"--dims must be all or active, got {dims!r}")
    job = AuditJob(
        model=model,
        data=data,
        out=out,
        where=where or [],
        group_by=[c.strip() for c in group_by.split(",") if c.strip()] if group_by else [],
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
    result = run_audit(job)
    s = result.summary
    typer.echo(
        f"audited {s['n_images']} images ({s['n_skipped']} skipped); effective sample size "
        f"{s['effective_sample_size']:.0f} ({s['effective_sample_fraction']:.0%}); outputs in {result.out}"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's run and audit.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(min=1)] = 8,
    n: Annotated[int, typer.Option(min=200, help="Images in the built-in dataset.")] = 4000,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train and audit on the built-in shapes dataset and show that its rare group was found."""
    from pipelines.demo import run_demo

    run_demo(out=out, epochs=epochs, n=n, device=device, progress=not quiet)


# -- commands of later issues are added above this line, one block per command ----------------------------------


def main() -> None:
    try:
        app()
    except DebiasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
