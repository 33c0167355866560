"""Quality metrics of generated images (FID, KID, precision/recall, CAS) and `debias quality`, on a tiny VAE trained
on builtin:shapes; the "generated" folders are written here in the format `debias augment` writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from debias.data import load_images
from debias.data.builtin import BUILTIN_DATASETS
from debias.evaluation.generation_metrics import (
    CasConfig,
    PrecomputedFeatures,
    classification_accuracy_score,
    extract_features,
    fid_kid,
    load_feature_extractor,
    precision_recall,
)
from debias.pipelines.synthetic_quality import QualityJob, run_quality
from tests.novelty_support import TINY_SIZE, noise_images, tiny_run

REAL = "builtin:shapes?n=300"  # what the tiny run was trained on
DATA_URI = re.compile(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"')


def write_synthetic_dir(
    folder: Path, images: np.ndarray, table: pd.DataFrame, method: str, source_paths: list[str] | None = None
) -> Path:
    """What `debias augment` writes: DIR/images/*.png and DIR/manifest.csv (path relative to DIR, the table's
    columns, synthetic=true, method, and source_path for CycleGAN)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, rec) in enumerate(zip(images, table.drop(columns=["path"], errors="ignore").to_dict("records"))):
        rel = f"images/{method}_{i:05d}.png"
        Image.fromarray(img).save(folder / rel)
        row = {"path": rel, **rec, "synthetic": True, "method": method}
        if source_paths is not None:
            row["source_path"] = source_paths[i]
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("quality") / "run")


@pytest.fixture(scope="module")
def features(run):
    return load_feature_extractor(run, "cpu")


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, pd.DataFrame]:
    return BUILTIN_DATASETS["shapes"](image_size=TINY_SIZE, n=300, seed=0)


def test_feature_module_is_what_torchmetrics_expects(features, shapes):
    images = shapes[0][:8]
    x_u8 = torch.from_numpy(images).permute(0, 3, 1, 2)
    f_u8, f_float = features(x_u8), features(x_u8.float() / 255)
    assert f_u8.shape == (8, features.num_features) and f_u8.dtype == torch.float64
    assert torch.allclose(f_u8, f_float)
    features.train()  # torchmetrics may call train(); the VAE must stay in eval mode
    assert not features.model.training


def test_fid_kid_self_near_zero_and_larger_for_other_sets(features, shapes):
    images = shapes[0]
    same = fid_kid(images[:200], images[:200], features)
    halves = fid_kid(images[:150], images[150:], features)
    noise = fid_kid(images[:150], noise_images(150), features)
    assert abs(same.fid) < 1e-6 * max(1.0, noise.fid) and abs(same.kid_mean) < 1e-6 * max(1.0, noise.kid_mean)
    assert noise.fid > 20 * halves.fid > 0
    assert noise.kid_mean > 20 * abs(halves.kid_mean)
    # deterministic for a fixed seed, and the global RNG is left alone
    state = torch.get_rng_state()
    again = fid_kid(images[:150], noise_images(150), features)
    assert (again.fid, again.kid_mean, again.kid_std) == (noise.fid, noise.kid_mean, noise.kid_std)
    assert torch.equal(state, torch.get_rng_state())


def test_kid_on_small_groups(features, shapes):
    images = shapes[0]
    five = fid_kid(images[:5], noise_images(5), features)
    assert five.kid_subset_size == 5 and five.reason is None
    assert np.isfinite(five.kid_mean) and five.kid_mean > 0 and np.isfinite(five.fid)
    capped = fid_kid(images[:40], images[40:70], features, subset_size=10)
    assert capped.kid_subset_size == 10 and capped.kid_std > 0
    one = fid_kid(images[:1], images[1:20], features)
    assert one.fid is None and one.kid_mean is None and "at least 2" in one.reason


def test_precomputed_features_give_the_same_values(features, shapes):
    real, fake = shapes[0][:60], noise_images(40)
    fr, ff = extract_features(real, features, batch_size=17), extract_features(fake, features)
    direct = fid_kid(real, fake, features)
    pre = fid_kid(fr, ff, PrecomputedFeatures(fr.shape[1]))
    assert pre.fid == pytest.approx(direct.fid, rel=1e-6)
    assert pre.kid_mean == pytest.approx(direct.kid_mean, rel=1e-6)


def test_precision_recall_on_known_configurations(features, shapes):
    real = extract_features(shapes[0][:200], features)
    same = precision_recall(real, real)
    assert same.precision == 1.0 and same.recall == 1.0
    collapsed = precision_recall(real, real[:1].repeat(100, 1))  # every generated sample is one real image
    assert collapsed.precision == 1.0 and collapsed.recall <= 0.02
    far = precision_recall(real, real + 100.0 * real.std(0).max())
    assert far.precision == 0.0 and far.recall == 0.0
    noise = precision_recall(real, extract_features(noise_images(100), features))
    assert noise.recall < 0.1  # noise images land in one small region: they cover almost none of the real ones
    tiny = precision_recall(real, real[:3], k=3)  # 3 generated samples have no 3rd neighbour
    assert tiny.recall is None and tiny.precision == 1.0 and "recall" in tiny.reason


def test_precision_recall_chunks_agree(monkeypatch):
    import debias.evaluation.generation_metrics as gm

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) * 1.3 + 0.2
    whole = precision_recall(real, fake, k=5)
    monkeypatch.setattr(gm, "_CDIST_ELEMENTS", 1000)  # chunks of 3-5 rows
    chunked = precision_recall(real, fake, k=5)
    assert (whole.precision, whole.recall) == (chunked.precision, chunked.recall)
    assert 0 < whole.precision < 1 and 0 < whole.recall < 1


def test_cas_high_when_synthetic_images_are_real_copies(tmp_path, shapes):
    images, table = shapes
    write_synthetic_dir(tmp_path / "syn", images[:200], table.iloc[:200], "gan")
    syn = load_images(str(tmp_path / "syn" / "manifest.csv"), image_size=TINY_SIZE, channels=3, progress=False)
    real = load_images(REAL, where=["split=test"], image_size=TINY_SIZE, progress=False)
    syn_colour, real_colour = syn.table["colour"].to_numpy(), real.table["colour"].to_numpy()
    config = CasConfig(epochs=8, device="cpu")
    res = classification_accuracy_score(syn, syn_colour, real, real_colour, groups=real.table["shape"].to_numpy(),
                                        config=config)
    assert res.accuracy > 0.9, res
    assert set(res.per_group) == set(real.table["shape"]) and res.missing_classes == []
    assert sum(g["n"] for g in res.per_group.values()) == len(real)
    # the same images with their labels shuffled carry no label information: accuracy falls towards chance
    shuffled = classification_accuracy_score(syn, np.random.default_rng(0).permutation(syn_colour), real, real_colour,
                                             config=config)
    assert shuffled.accuracy < res.accuracy - 0.3, shuffled
    one_class = classification_accuracy_score(
        syn, np.full(len(syn), "red"), real, real_colour, config=CasConfig(epochs=1, device="cpu")
    )
    assert one_class.accuracy is None and "2" in one_class.reason


def test_run_quality_writes_json_and_html(tmp_path, run, shapes):
    images, table = shapes
    syn_dir = tmp_path / "syn"
    write_synthetic_dir(syn_dir, images[:60], table.iloc[:60], "gan")
    # CycleGAN rows in the same folder: "translations" of real rows, whose source_path names the real row
    cyc = tmp_path / "cyc"
    write_synthetic_dir(cyc, images[60:72][:, ::-1].copy(), table.iloc[60:72], "cyclegan",
                        source_paths=table["path"].iloc[60:72].tolist())
    manifest = pd.concat([pd.read_csv(syn_dir / "manifest.csv"), pd.read_csv(cyc / "manifest.csv")])
    for rel in pd.read_csv(cyc / "manifest.csv")["path"]:
        (syn_dir / rel).write_bytes((cyc / rel).read_bytes())
    manifest.to_csv(syn_dir / "manifest.csv", index=False)

    out = tmp_path / "quality"
    result = run_quality(QualityJob(
        real=REAL, synthetic=syn_dir, features=run, out=out, group_by="shape", label="colour",
        cas=CasConfig(epochs=1, device="cpu"), device="cpu", kid_subsets=10, progress=False,
    ))
    saved = json.loads((out / "quality.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(result["metrics"]))
    keys = {(r["method"], r["group"]) for r in saved["metrics"]}
    assert {("gan", "all"), ("cyclegan", "all"), ("gan", "circle"), ("cyclegan", "square")} <= keys
    gan_all = next(r for r in saved["metrics"] if (r["method"], r["group"]) == ("gan", "all"))
    assert gan_all["n_real"] == 300 and gan_all["n_fake"] == 60 and gan_all["precision"] > 0.9
    assert set(saved["cas"]) == {"gan", "cyclegan"} and saved["cas"]["gan"]["accuracy"] is not None

    page = (out / "quality.html").read_text()
    assert len(DATA_URI.findall(page)) > 20  # grids, pairs and the chart, all inline
    assert "CycleGAN: source → translated" in page and "12 translated images" in page
    assert "Classification accuracy score" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def _debias(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "debias", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=120)


def test_bad_synthetic_dir_is_a_one_line_error(tmp_path, run):
    bad = tmp_path / "syn"
    bad.mkdir()
    proc = _debias("quality", "--real", REAL, "--synthetic", str(bad), "--features", str(run), "--out",
                   str(tmp_path / "q"), "-q")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "no manifest.csv" in lines[0], proc.stderr


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "no such folder"),
    (lambda d: d.write_text("x"), "not a folder"),
    (lambda d: (d.mkdir(), (d / "manifest.csv").write_text("path\nimages/missing.png\n")), "none of the 1 images could be read"),
])
def test_other_bad_synthetic_dirs(tmp_path, run, setup, fragment):
    from debias.errors import DebiasError

    bad = tmp_path / "syn"
    setup(bad)
    with pytest.raises(DebiasError, match=fragment):
        run_quality(QualityJob(real=REAL, synthetic=bad, features=run, out=tmp_path / "q", device="cpu",
                               progress=False))


def test_unknown_group_column_is_an_error(tmp_path, run, shapes):
    from debias.errors import DebiasError

    images, table = shapes
    syn = write_synthetic_dir(tmp_path / "syn", images[:10], table.iloc[:10][["path", "shape"]], "gan")
    with pytest.raises(DebiasError, match="--group-by 'colour'.*generated images"):
        run_quality(QualityJob(real=REAL, synthetic=syn, features=run, out=tmp_path / "q", group_by="colour",
                               device="cpu", progress=False))


def test_quality_page_escapes_hostile_values():
    """The quality page comes from a Jinja2 template with autoescape: text from the data (group names, methods,
    notes, pair captions, the title) stays text, in element content and in attributes."""
    from debias.reports.quality import GroupImages, QualityPage, render_quality_html

    hostile = "<script>alert(1)</script>"
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    page = QualityPage(
        title=f"Quality {hostile}", summary={"real": f"data/{hostile}.csv"},
        metrics=[{"method": hostile, "group": hostile, "n_real": 3, "n_fake": 2, "fid": 1.5, "kid_mean": 0.01,
                  "kid_std": 0.001, "precision": 0.5, "recall": 0.5, "note": f'"{hostile}"'}],
        cas={hostile: {"accuracy": 0.5, "reason": hostile, "per_group": {hostile: {"n": 3, "accuracy": 0.5}}}},
        grids=[GroupImages(hostile, hostile, images, images)],
        pairs=rng.integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8), pair_captions=[(f'src "{hostile}"', hostile)],
        pairs_note=hostile, feature_note=hostile,
    )
    html = render_quality_html(page)
    assert "<script" not in html.lower()
    assert f"<title>Quality {escaped}</title>" in html and f"data/{escaped}.csv" in html
    assert f"<h3>{escaped}: accuracy 0.5</h3>" in html and f"<h3>{escaped} · {escaped}</h3>" in html
    assert f'alt="src &#34;{escaped}&#34;"' in html and f"<td>&#34;{escaped}&#34;</td>" in html
    assert len(DATA_URI.findall(html)) == 2 + 2 + 2 + 1  # generated, real, the pair, the chart
