"""`debias demo`: train on the built-in shapes set, audit it, and show that the known rare group was found.

The built-in set has a planted rare subgroup (white triangles, 2 % of rows; white appears nowhere else), so the
audit can be checked against ground truth: the rare rows should get the highest rarity (AUROC near 1) and several
times the mean resampling weight of the rest.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from sklearn.metrics import roc_auc_score

from debias.pipelines.audit import AuditJob, AuditResult, group_table, run_audit
from debias.pipelines.train import TrainJob, run_train
from debias.training.vae import TrainConfig

DEMO_IMAGE_SIZE = 32
DEMO_LATENT_DIM = 16


def run_demo(out: Path, epochs: int = 12, n: int = 4000, device: str = "auto", progress: bool = True) -> AuditResult:
    console = Console()
    source = f"builtin:shapes?n={n}"
    console.print(f"[bold]1/2 training[/] a beta-VAE on {source} ({epochs} epochs, {DEMO_IMAGE_SIZE} px)")
    run_dir = out / "model"
    # resume=True makes the demo re-runnable: a finished run is reused, an interrupted one continues.
    run_train(
        TrainJob(
            data=source,
            out=run_dir,
            image_size=DEMO_IMAGE_SIZE,
            latent_dim=DEMO_LATENT_DIM,
            train=TrainConfig(epochs=epochs, device=device),
            # No contrastive encoder: the VAE alone finds the planted group (AUROC 0.997; 1.000 with the encoder,
            # docs/benchmarks.md issue 15), and its 600 steps would more than double the demo's time.
            contrastive_epochs=0,
            resume=True,
            progress=progress,
        )
    )
    console.print("[bold]2/2 auditing[/] every image for rarity")
    result = run_audit(
        AuditJob(model=run_dir, data=source, out=out / "audit", group_by=["group"], device=device, progress=progress)
    )
    scores = result.scores
    rare = scores["rare"].astype(int).to_numpy() == 1
    auroc = roc_auc_score(rare, scores["rarity"])
    summary = result.summary
    groups = summary["groups"]["group"]
    console.print(group_table("group (built-in shapes; the planted rare group is white triangle)", groups,
                              highlight="white triangle"))
    ratio = groups["white triangle"]["weight_ratio"]
    console.print(
        f"rare group (white triangle): {rare.sum()} of {len(rare)} rows ({rare.mean():.1%}), "
        f"{groups['white triangle']['weight_share']:.1%} of the weight: weight ratio {ratio:.1f} "
        f"(share of weight ÷ share of rows); AUROC of rarity {auroc:.3f}"
    )
    console.print(
        f"effective sample size: {summary['effective_sample_fraction']:.0%} of the rows, as tempered "
        f"(--target-ess); the paper's untempered inverse-density weights keep "
        f"{summary['untempered_effective_sample_fraction']:.2%} (the lower, the more a few rows stand out)"
    )
    console.print(f"report: {result.out / 'report.html'}")
    return result
