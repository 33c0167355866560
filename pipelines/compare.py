"""Several ``--reweight`` methods x several seeds on the same data, side by side: `debias train-classifier` with more
than one method or seed (or ``--oracle-groups``), and its alias `debias compare`.

Every run is a plain `train-classifier` run in ``OUT/runs/METHOD/seedS`` with the same data, architecture, epochs and
options; only the method and the seed change. Finished runs are reused (a comparison that was interrupted continues
where it stopped, and an unfinished run resumes from its checkpoint); a finished run made with other options is
refused rather than mixed in.

Outputs in ``OUT``:
    comparison.md      summary table (mean ± std over seeds), paired differences to ERM, per-group accuracy tables
    comparison.json    the same figures, with every seed's value
    groups_COL.png     a bar chart of per-group accuracy for each grouping (mean over seeds, error bars = std)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from debias.errors import DebiasError
from debias.pipelines.train_classifier import (
    METHODS,
    ORACLE,
    ClassifierJob,
    job_signature,
    run_train_classifier,
)
from debias.runtime.checkpoint import atomic_savefig, atomic_write_text, write_json

BASELINE = "none"
ORACLE_LABEL = "oracle (reads groups; reference)"


@dataclass
class CompareJob:
    base: ClassifierJob  # template; method, seed and out are set per run
    out: Path
    methods: list[str] = field(default_factory=lambda: ["none", "auto", "jtt"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # Group columns for the oracle reference: group-balanced sampling that reads them, run beside the methods as the
    # ceiling of what resampling can reach. With it (and ERM among the methods) every method also reports the share
    # of the ERM -> oracle worst-group gap it closes.
    oracle_groups: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class CompareResult:
    summary: dict[str, Any]
    markdown: str
    out: Path


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def run_compare(job: CompareJob) -> CompareResult:
    unknown = [m for m in job.methods if m not in METHODS]
    if unknown or not job.methods:
        raise DebiasError(f"--reweight must be one or more of {', '.join(METHODS)}, got {job.methods}")
    if not job.seeds:
        raise DebiasError("--seeds needs at least one seed")
    if "two-stage" in job.methods and job.base.weights is None:  # refused before the other methods train
        raise DebiasError("--weights DIR/scores.parquet is needed by --reweight two-stage")
    methods = list(job.methods)
    if job.oracle_groups:
        if BASELINE not in methods:
            methods.insert(0, BASELINE)  # the gap is measured from ERM
        methods.append(ORACLE)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    total = len(methods) * len(job.seeds)
    k = 0
    # Seed-major order: an interrupted comparison already holds every method for its first seeds.
    for seed in job.seeds:
        for method in methods:
            k += 1
            rjob = replace(
                job.base,
                method=method,
                out=run_dir(job.out, method, seed),
                train=replace(job.base.train, seed=seed),
                weights=job.base.weights if method == "two-stage" else None,
                oracle_groups=list(job.oracle_groups) if method == ORACLE else [],
                resume=True,
                show_table=False,
            )
            done = rjob.out / "metrics.json"
            if done.exists():
                metrics = json.loads(done.read_text())
                if {k2: v for k2, v in metrics["config"].items() if k2 != "model"} != _json(job_signature(rjob)):
                    raise DebiasError(f"{rjob.out} holds a finished run with other options; choose another --out")
                if job.progress:
                    print(f"[{k}/{total}] {method} seed {seed}: reusing {done}")
            else:
                if job.progress:
                    print(f"[{k}/{total}] {method} seed {seed}")
                metrics = run_train_classifier(rjob).metrics
            runs[method].append(metrics)

    summary = summarise(runs)
    markdown = to_markdown(summary)
    job.out.mkdir(parents=True, exist_ok=True)
    write_json(summary, job.out / "comparison.json")
    atomic_write_text(markdown, job.out / "comparison.md")
    for grouping in summary["groupings"]:
        plot_groups(summary, grouping, job.out / f"groups_{_file_safe(grouping)}.png")
    return CompareResult(summary=summary, markdown=markdown, out=job.out)


# ---------------------------------------------------------------------------------------------- aggregation
def _stats(values: list[float | None]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {
        "mean": float(v.mean()) if v.size else None,
        "std": float(v.std(ddof=1)) if v.size > 1 else None,  # sample standard deviation over seeds
        "values": [None if x is None else float(x) for x in values],
    }


def _run_figures(m: dict[str, Any]) -> dict[str, float | None]:
    """The per-run figures that the comparison summarises."""
    fig: dict[str, float | None] = {
        "accuracy": m["accuracy"],
        "auroc": m["auroc"],
        "worst_group_accuracy": m.get("worst_group_accuracy"),
        "group_accuracy_variance": m.get("group_accuracy_variance"),
        "validation_accuracy": m["validation_accuracy"],
        "selected_epoch": m["selected_epoch"],
        "epoch_s": float(np.median(m["epoch_s"])),
        "weights_s": float(np.median(m["weights_s"])),
        "weights_share_of_epoch": float(np.median(np.asarray(m["weights_s"]) / np.asarray(m["epoch_s"]))),
        "ess_fraction": float(np.mean(m["effective_sample_size_per_epoch"]) / m["n_train"]),
    }
    for name, g in m["groupings"].items():
        fig[f"worst {name} accuracy"] = g["worst_group_accuracy"]
        fig[f"{name} accuracy variance"] = g["accuracy_variance"]
    return fig


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    groupings: dict[str, dict[str, dict[str, Any]]] = {}
    per_run = {m: [_run_figures(r) for r in rs] for m, rs in runs.items()}
    for method, rs in runs.items():
        figs = per_run[method]
        methods[method] = {
            "seeds": [r["seed"] for r in rs],
            "metrics": {key: _stats([f.get(key) for f in figs]) for key in figs[0]},
        }
        for name in rs[0]["groupings"]:
            groups = groupings.setdefault(name, {}).setdefault(method, {})
            for g in rs[0]["groupings"][name]["groups"]:
                groups[g] = _stats([r["groupings"][name]["groups"].get(g, {}).get("accuracy") for r in rs])
    deltas: dict[str, Any] = {}
    if BASELINE in runs:
        base = {r["seed"]: f for r, f in zip(runs[BASELINE], per_run[BASELINE])}
        for method in runs:
            if method == BASELINE:
                continue
            paired = [(f, base[r["seed"]]) for r, f in zip(runs[method], per_run[method]) if r["seed"] in base]
            if not paired:
                continue
            d: dict[str, Any] = {}
            for key in paired[0][0]:
                if not (key.startswith("worst ") or key == "accuracy" or key.endswith(" accuracy variance")):
                    continue
                vals = [a[key] - b[key] for a, b in paired if a.get(key) is not None and b.get(key) is not None]
                d[key] = _stats(vals)
                if key.endswith("variance"):
                    # Ratio of the mean variances (method / ERM): a mean of per-seed ratios explodes whenever one ERM
                    # seed happens to have near-equal group accuracies. The per-seed ratios are kept as values.
                    a_mean = np.mean([a[key] for a, _ in paired])
                    b_mean = np.mean([b[key] for _, b in paired])
                    d[key + " ratio"] = {
                        "mean": float(a_mean / b_mean) if b_mean > 0 else None,
                        "std": None,
                        "values": [a[key] / b[key] if b[key] else None for a, b in paired],
                    }
            deltas[method] = d
    gap = gap_closed(runs) if ORACLE in runs and BASELINE in runs else {}
    first = next(iter(runs.values()))[0]
    return {
        "gap_closed": gap,
        "label": first["label"],
        "eval_set": first["eval_set"],
        "config": {k: v for k, v in first["config"].items() if k != "method_options"},
        "methods": methods,
        "deltas_vs_none": deltas,
        "groupings": groupings,
        "method_options": {m: rs[0]["config"]["method_options"] for m, rs in runs.items()},
    }


def gap_closed(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method, the share of the ERM -> oracle worst-group gap it closes, paired by seed:
    (worst_m - worst_ERM) / (worst_oracle - worst_ERM). 1 = as good as group-balanced sampling, 0 = as ERM, < 0 worse.
    The worst group is that of the finest grouping (the cross product of --eval-groups)."""
    def worst(rs: list[dict[str, Any]]) -> dict[int, float]:
        return {r["seed"]: r.get("worst_group_accuracy") for r in rs}

    base, oracle = worst(runs[BASELINE]), worst(runs[ORACLE])
    out: dict[str, Any] = {}
    for method, rs in runs.items():
        if method in (BASELINE, ORACLE):
            continue
        vals = []
        for seed, w in worst(rs).items():
            b, o = base.get(seed), oracle.get(seed)
            if None in (w, b, o) or o - b <= 0:
                continue  # no gap to close on this seed
            vals.append((w - b) / (o - b))
        out[method] = _stats(vals)
    return out


# ------------------------------------------------------------------------------------------------- writing
def _pct(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if s["mean"] is None:
        return "–"
    out = f"{s['mean'] * scale:.{digits}f}"
    return out + (f" ± {s['std'] * scale:.{digits}f}" if s["std"] is not None else "")


def to_markdown(summary: dict[str, Any]) -> str:
    """Metrics as rows and methods as columns, so that many groupings still fit a page."""
    methods = summary["methods"]
    keys = list(next(iter(methods.values()))["metrics"])
    shown = ["accuracy", "auroc"] + [k for k in keys if k.startswith("worst ")] + [
        k for k in keys if k.endswith(" accuracy variance")
    ] + ["validation_accuracy", "selected_epoch", "epoch_s", "weights_share_of_epoch", "ess_fraction"]
    seeds = {len(m["seeds"]) for m in methods.values()}
    lines = [
        f"Label `{summary['label']}`, evaluated on {summary['eval_set']}; mean ± std over "
        f"{'/'.join(map(str, sorted(seeds)))} seeds. Accuracies in %, variances of the group accuracies in %² "
        "(paper Table 1), epoch time in s (median per run), weights share = time spent choosing the epoch's rows / "
        "epoch time, ESS fraction = effective sample size of the sampling weights / n.",
        "",
        "| metric | " + " | ".join(_label(m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for k in shown:
        lines.append(f"| {_header(k)} | " + " | ".join(_cell(k, m["metrics"][k]) for m in methods.values()) + " |")
    gap = summary.get("gap_closed") or {}
    if gap:
        lines.append(
            "| share of the ERM→oracle worst-group gap closed | "
            + " | ".join(_pct(gap[m], 1.0, 2) if m in gap else "–" for m in methods)
            + " |"
        )
    deltas = summary["deltas_vs_none"]
    if deltas:
        lines += ["", f"Paired differences to ERM (`{BASELINE}`), same seed: method − {BASELINE}; variances also as "
                  f"the ratio of the mean variances, method / {BASELINE}.", ""]
        dkeys = list(next(iter(deltas.values())))
        lines.append("| metric | " + " | ".join(f"{m} − {BASELINE}" for m in deltas) + " |")
        lines.append("|---|" + "---|" * len(deltas))
        for k in dkeys:
            lines.append(f"| {_header(k)} | " + " | ".join(_cell(k, d[k], delta=True) for d in deltas.values()) + " |")
    for name, per_method in summary["groupings"].items():
        groups = list(next(iter(per_method.values())))
        lines += ["", f"Accuracy per `{name}` group (%):", ""]
        lines.append("| group | " + " | ".join(per_method) + " |")
        lines.append("|---|" + "---|" * len(per_method))
        for g in groups:
            lines.append(f"| {g} | " + " | ".join(_pct(per_method[m][g]) for m in per_method) + " |")
    return "\n".join(lines) + "\n"


def _label(method: str) -> str:
    return ORACLE_LABEL if method == ORACLE else method


def _header(key: str) -> str:
    return key.replace("_", " ")


def _cell(key: str, s: dict[str, Any], delta: bool = False) -> str:
    if key.endswith("ratio"):
        return _pct(s, 1.0, 2)
    if key.endswith("variance"):
        out = _pct(s, 1e4, 1)  # fractions² -> %²
    elif key in ("epoch_s", "weights_s", "selected_epoch"):
        out = _pct(s, 1.0, 1)
    elif key in ("auroc", "weights_share_of_epoch", "ess_fraction"):
        out = _pct(s, 1.0, 3)
    else:
        out = _pct(s)
    return "+" + out if delta and s["mean"] is not None and s["mean"] >= 0 else out


def plot_groups(summary: dict[str, Any], grouping: str, path: Path) -> None:
    from matplotlib.figure import Figure

    per_method = summary["groupings"][grouping]
    methods = list(per_method)
    groups = list(per_method[methods[0]])
    x = np.arange(len(groups))
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(methods)) / 2 + 2), 4))
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(methods):
        mean = [100 * (per_method[m][g]["mean"] or 0.0) for g in groups]
        std = [100 * (per_method[m][g]["std"] or 0.0) for g in groups]
        gap = (summary.get("gap_closed") or {}).get(m)
        label = _label(m) + (f", closes {gap['mean']:.2f} of the gap" if gap and gap["mean"] is not None else "")
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=label)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel("accuracy (%)")
    lo = min(100 * (per_method[m][g]["mean"] or 0.0) for m in methods for g in groups)
    ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_title(f"accuracy per {grouping} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name.replace(" x ", "_x_"))


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
