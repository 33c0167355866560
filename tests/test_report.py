"""The HTML audit report: sections present, images embedded and decodable, nothing external, text escaped."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from debias.reports.audit import (
    AuditReport,
    figure_to_data_uri,
    image_grid,
    write_report,
)

SPECIAL = "<b>x</b>"
ESCAPED = "&lt;b&gt;x&lt;/b&gt;"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

HEADINGS = [
    "Rarity and weight distributions",
    "Rarest samples",
    "Most typical samples",
    "Reconstructions",
    "Latent traversals",
    "Samples from the prior",
    "Latent histograms",
    "Groups",
    "Run details",  # the internals last
]


def _make_report(channels: int, *, k: int = 4, m: int = 3, d: int = 2, s: int = 5, p: int = 4, hw: int = 8) -> AuditReport:
    rng = np.random.default_rng(0)
    n = 60

    def imgs(*lead: int) -> np.ndarray:
        return rng.integers(0, 256, size=(*lead, hw, hw, channels), dtype=np.uint8)

    rarity = rng.normal(5.0, 1.0, n)
    weight = np.exp(rarity - rarity.max())
    weight /= weight.sum()
    group = np.array(["a", SPECIAL, "c$"])[rng.integers(0, 3, n)]  # "$" would trip matplotlib mathtext
    scores = pd.DataFrame(
        {"path": [f"img_{i}.png" for i in range(n)], "group": group, "rarity": rarity, "weight": weight,
         "recon_error": rng.random(n)}
    )
    g = scores.groupby("group")
    table = pd.DataFrame(
        {
            "count": g.size(),
            "share": g.size() / n,
            "mean_rarity": g["rarity"].mean(),
            "mean_weight": g["weight"].mean(),
            "weight_share": g["weight"].sum(),
        }
    )
    table["weight_ratio"] = table["mean_weight"] / weight.mean()
    latent = rng.normal(size=(n, 3))
    return AuditReport(
        title=f"Audit {SPECIAL}",
        summary={"samples": n, "skipped files": [f"bad_{i}.jpg" for i in range(15)], "effective sample size": 41.5,
                 "model": "VAE z=3"},
        scores=scores,
        latent_hist=[np.histogram(latent[:, j], bins=10) for j in range(3)],
        dim_labels=[f"z{j} (KL 1.{j})" for j in range(3)],
        rarest=imgs(k),
        rarest_captions=[f"rarity {r:.2f} {SPECIAL}" for r in np.sort(rarity)[::-1][:k]],
        typical=imgs(k),
        typical_captions=[f"t{i}" for i in range(k)],
        recon_originals=imgs(m),
        recon_outputs=imgs(m),
        traversals=imgs(d, s),
        traversal_labels=[f"z{j}" for j in range(d)],
        traversal_values=list(np.linspace(-3, 3, s)),
        prior_samples=imgs(p),
        group_tables={"group": table},
        rarity_auroc={SPECIAL: 0.61},
    )


def _decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()  # forces a full decode, not just the header
    return img


@pytest.mark.parametrize("channels", [3, 1])
def test_full_report(tmp_path, channels: int) -> None:
    k, m, d, s, p = 4, 3, 2, 5, 4
    rep = _make_report(channels, k=k, m=m, d=d, s=s, p=p)
    out = write_report(rep, tmp_path / "sub" / "report.html")
    assert out.exists() and out == tmp_path / "sub" / "report.html"
    text = out.read_text(encoding="utf-8")

    # Sections present and in the documented order.
    positions = [text.find(f"<h2>{h}</h2>") for h in HEADINGS]
    assert all(pos >= 0 for pos in positions), dict(zip(HEADINGS, positions))
    assert positions == sorted(positions)

    # Exact image count: sample images (class "px") and plots (class "plot": distributions,
    # latent histograms, one chart per group table).
    n_px = text.count('<img class="px"')
    n_plot = text.count('<img class="plot"')
    assert n_px == 2 * k + 2 * m + d * s + p
    assert n_plot == 3
    assert len(DATA_URI.findall(text)) == n_px + n_plot

    # Self-contained: no external URL, script or stylesheet link anywhere.
    lowered = text.lower()
    for needle in ("http://", "https://", "<script", "<link", "url(", "@import"):
        assert needle not in lowered, needle
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', text))

    # User text escaped everywhere (title, captions, group values, AUROC keys).
    assert SPECIAL not in text
    assert "&lt;b&gt;x&lt;/b&gt;" in text
    # Abbreviated long list in the summary.
    assert "15 items" in text

    # Embedded PNGs decode; sample images are greyscale iff the input was, and upscaled.
    first_px = re.search(r'<img class="px" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text).group(1)
    img = _decode(first_px)
    assert img.mode == ("L" if channels == 1 else "RGB")
    assert img.size[0] == img.size[1] and img.size[0] > 8 and img.size[0] % 8 == 0
    first_plot = re.search(r'<img class="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text).group(1)
    assert _decode(first_plot).size[0] > 100


def test_empty_sections_are_omitted(tmp_path) -> None:
    rep = _make_report(3)
    rep.group_tables = {}
    rep.rarity_auroc = {}
    rep.traversals = np.zeros((0, 0, 8, 8, 3), dtype=np.uint8)
    rep.traversal_labels = []
    rep.prior_samples = np.zeros((0, 8, 8, 3), dtype=np.uint8)
    rep.recon_originals = np.zeros((0, 8, 8, 3), dtype=np.uint8)
    rep.recon_outputs = np.zeros((0, 8, 8, 3), dtype=np.uint8)
    rep.latent_hist, rep.dim_labels = [], []
    text = write_report(rep, tmp_path / "r.html").read_text(encoding="utf-8")
    for gone in ("Groups", "Latent traversals", "Samples from the prior", "Reconstructions", "Latent histograms"):
        assert f"<h2>{gone}</h2>" not in text
    for kept in ("Run details", "Rarest samples", "Most typical samples"):
        assert f"<h2>{kept}</h2>" in text


def test_image_grid_scales_and_escapes() -> None:
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    snippet = image_grid(grey, ncols=2, captions=["<i>a</i>", 'b"q'], scale=3)
    assert "<i>a</i>" not in snippet and "&lt;i&gt;a&lt;/i&gt;" in snippet
    assert 'b"q' not in snippet and "b&#34;q" in snippet  # in the alt attribute and the caption
    uris = DATA_URI.findall(snippet)
    assert len(uris) == 2
    img = _decode(uris[0])
    assert img.mode == "L" and img.size == (12, 12)
    # Nearest neighbour: every source pixel becomes a 3x3 block of the same value.
    arr = np.asarray(img)
    assert np.array_equal(arr[::3, ::3], grey[0, :, :, 0])
    assert np.array_equal(arr, np.repeat(np.repeat(grey[0, :, :, 0], 3, 0), 3, 1))
    assert image_grid(np.zeros((0, 4, 4, 3), dtype=np.uint8), ncols=4) == ""
    with pytest.raises(ValueError):
        image_grid(np.zeros((1, 4, 4, 3), dtype=np.float32), ncols=1)


def test_figure_to_data_uri() -> None:
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [1, 0])
    uri = figure_to_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert b"matplotlib.org" not in raw  # the Software tag (a URL) is stripped
    assert _decode(uri.split(",", 1)[1]).format == "PNG"


def test_the_report_opens_with_the_finding(tmp_path) -> None:
    """Issue 15: the first section names the under-represented groups with their weight ratio and example thumbnails
    (captioned with group and path), then the rarest rows and the latent factor that sets them apart; the run's
    internals come last. Everything from the data is escaped."""
    from debias.reports.audit import GroupFinding, RowsFinding, Thumb, png_data_uri

    img = png_data_uri(np.zeros((8, 8, 3), np.uint8))
    report = _make_report(3)
    report.finding_groups = [GroupFinding(
        grouping="race", group=f"black {SPECIAL}", count=245, share=0.027, even_share=0.2, weight_share=0.081,
        ratio=3.0, auroc=0.71, examples=[Thumb(img, f"black · faces/{SPECIAL}.jpg")] * 3,
    )]
    report.finding_rows = RowsFinding(
        estimator="knn-recon", n_rows=9000, n_shown=16, examples=[Thumb(img, "a.png")] * 16, by_reconstruction=11,
        dim_label="z4", dim_shift=2.5, traversal=[img] * 9, traversal_values=[f"{v:+.2f}" for v in range(9)],
    )
    text = write_report(report, tmp_path / "report.html").read_text(encoding="utf-8")
    first = text.find("<h2>")
    assert text[first:].startswith("<h2>What the audit found</h2>")
    assert text.find("<h2>Run details</h2>") > text.find("<h2>Groups</h2>") > first
    finding = " ".join(text[first : text.find("</section>", first)].split())
    assert "245 rows, 2.7 % of the data where an even split would give 20.0 %" in finding
    assert "8.1 % of the weight: weight ratio <b>3.00</b>" in finding and "0.710" in finding
    assert finding.count(f"black · faces/{ESCAPED}.jpg") == 6  # alt text and caption of each of the 3 thumbnails
    assert SPECIAL not in finding
    assert "11 of them are rare mainly because the model" in finding and "<b>z4</b>" in finding
    assert finding.count("<img ") == 3 + 16 + 9


def test_report_without_groups_says_no_group_and_still_shows_the_rarest_rows(tmp_path) -> None:
    from debias.reports.audit import RowsFinding, Thumb, png_data_uri

    img = png_data_uri(np.zeros((8, 8, 3), np.uint8))
    report = _make_report(3)
    report.finding_rows = RowsFinding(
        estimator="histogram", n_rows=100, n_shown=4, examples=[Thumb(img, "a.png")] * 4, by_reconstruction=None,
        dim_label="z1", dim_shift=1.0, traversal=[], traversal_values=[],
    )
    text = write_report(report, tmp_path / "report.html").read_text(encoding="utf-8")
    finding = text[text.find("<h2>What the audit found</h2>") :]
    finding = " ".join(finding[: finding.find("</section>")].split())
    assert "No group holds less than half an even share" in finding  # group tables exist, none under-represented
    assert "The rarest rows" in finding and "rare mainly because" not in finding


HOSTILE = "<script>alert(1)</script>"


def test_hostile_values_are_escaped_by_the_templates(tmp_path) -> None:
    """The page is rendered from Jinja2 templates with autoescape: a path, group name, title or caption that holds
    markup or a quote stays text everywhere (element content and attributes), and the modules escape nothing by hand."""
    import inspect

    import debias.reports.audit as audit_module
    import debias.reports.quality as quality_module
    from debias.reports.audit import GroupFinding, RowsFinding, Thumb, png_data_uri

    img = png_data_uri(np.zeros((8, 8, 3), np.uint8))
    report = _make_report(3)
    report.title = f"Audit of {HOSTILE}"
    report.scores["path"] = [f"faces/{HOSTILE}_{i}.jpg" for i in range(len(report.scores))]
    report.rarest_captions = [f'rare "{i}" {HOSTILE}' for i in range(len(report.rarest_captions))]
    report.summary = {"manifest": f"data/{HOSTILE}/manifest.csv", HOSTILE: [HOSTILE] * 12}
    table = report.group_tables["group"]
    table.index = [HOSTILE, 'quote"d', "c"]
    table.index.name = f"col {HOSTILE}"
    report.group_tables = {f"grouping {HOSTILE}": table}
    report.rarity_auroc = {HOSTILE: 0.6}
    report.traversal_labels = [HOSTILE, 'z"1']
    report.finding_groups = [GroupFinding(
        grouping=HOSTILE, group=HOSTILE, count=3, share=0.05, even_share=0.33, weight_share=0.2, ratio=4.0,
        auroc=None, examples=[Thumb(img, f'say "hi" {HOSTILE}')],
    )]
    report.finding_rows = RowsFinding(
        estimator=HOSTILE, n_rows=60, n_shown=1, examples=[Thumb(img, HOSTILE)], by_reconstruction=None,
        dim_label=HOSTILE, dim_shift=1.0, traversal=[img], traversal_values=[HOSTILE],
    )
    text = write_report(report, tmp_path / "report.html").read_text(encoding="utf-8")

    assert "<script" not in text.lower() and "alert(1)</" not in text
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<title>Audit of {escaped}</title>" in text and f"<h1>Audit of {escaped}</h1>" in text
    assert f"faces/{escaped}_" in text  # the rarest rows' paths
    assert f"data/{escaped}/manifest.csv" in text and "12 items" in text  # summary values, abbreviated list
    assert f"<h3>grouping {escaped}</h3>" in text and f"<th>col {escaped}</th>" in text
    assert f"<th>{escaped}</th>" in text  # group table row and AUROC table
    # A quote in a caption cannot close the alt attribute it also lands in.
    assert f'alt="rare &#34;0&#34; {escaped}"' in text
    assert re.search(f'<figcaption style="width:[0-9]+px">rare &#34;0&#34; {re.escape(escaped)}</figcaption>', text)
    assert f'alt="say &#34;hi&#34; {escaped}"' in text
    assert 'quote&#34;d' in text and 'alt="z&#34;1 step 0"' in text
    # Every src is still one of our inline images, and no attribute was broken open.
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', text))
    # No manual escaping left in the modules: the templates' autoescape does it.
    for module in (audit_module, quality_module):
        source = inspect.getsource(module)
        assert "escape_html" not in source and "html.escape" not in source, module.__name__
