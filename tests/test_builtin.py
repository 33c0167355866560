"""Synthetic builtin datasets: parameters, determinism, exact subgroup sizes, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from debias.data import BUILTIN_DATASETS, load_images
from debias.errors import DataError

SHAPES = BUILTIN_DATASETS["shapes"]
SPURIOUS = BUILTIN_DATASETS["spurious"]


def test_shapes_table_defaults_and_rare_fraction():
    t = SHAPES.table()
    assert len(t) == 4000
    assert list(t.columns) == ["path", "shape", "colour", "group", "rare", "split", "size"]
    assert t["path"].iloc[123] == "builtin:shapes/000123"
    rare = t[t["rare"] == 1]
    assert len(rare) == round(4000 * 0.02) == 80
    assert set(rare["group"]) == {"white triangle"}
    assert (t["colour"] == "white").sum() == 80  # white appears nowhere else
    common = t[t["rare"] == 0]
    for col, values in (("shape", {"circle", "square", "triangle"}), ("colour", {"red", "green", "blue"})):
        counts = common[col].value_counts()
        assert set(counts.index) == values
        assert counts.min() > len(common) / 3 * 0.9  # roughly uniform
    assert (t["group"] == t["colour"] + " " + t["shape"]).all()
    assert t["size"].between(0.35, 0.65).all()
    test_frac = (t["split"] == "test").mean()
    assert 0.18 < test_frac < 0.22
    assert set(rare["split"]) == {"train", "test"}  # the rare rows are spread over both splits


@pytest.mark.parametrize("n, rare", [(1000, 0.03), (333, 0.01), (50, 0.5), (10, 0.0)])
def test_rare_count_is_exact(n, rare):
    t = SHAPES.table(n=n, rare=rare)
    assert len(t) == n and int(t["rare"].sum()) == round(n * rare)
    assert ((t["colour"] == "white") == (t["rare"] == 1)).all()


def test_spurious_correlation_and_balance():
    t = SPURIOUS.table(n=4000, corr=0.9, seed=3)
    assert list(t.columns) == ["path", "label", "colour", "group", "split"]
    train, test = t[t["split"] == "train"], t[t["split"] == "test"]
    assert len(test) == 800 and len(train) == 3200
    agree = ((train["label"] == "circle") & (train["colour"] == "red")) | (
        (train["label"] == "square") & (train["colour"] == "blue")
    )
    assert agree.sum() == round(0.9 * 3200)
    assert set(train["label"]) == {"circle", "square"} and abs((train["label"] == "circle").sum() - 1600) <= 1
    combos = test.groupby(["label", "colour"]).size()
    assert len(combos) == 4 and combos.max() - combos.min() <= 1
    assert (t["group"] == t["colour"] + " " + t["label"]).all()
    default = SPURIOUS.table()
    tr = default[default["split"] == "train"]
    agree = ((tr["label"] == "circle") == (tr["colour"] == "red")).mean()
    assert agree == pytest.approx(0.98, abs=1e-3)


def test_tables_are_deterministic_and_seeded():
    assert SHAPES.table(n=200, seed=5).equals(SHAPES.table(n=200, seed=5))
    assert not SHAPES.table(n=200, seed=5).equals(SHAPES.table(n=200, seed=6))
    assert SPURIOUS.table(n=100).equals(SPURIOUS.table(n=100, seed=0, corr=0.98))


def test_load_builtin_with_parameters_is_deterministic(tmp_path):
    src = "builtin:shapes?n=60&seed=2&rare=0.1"
    a = load_images(src, image_size=16, progress=False, cache_dir=tmp_path / "a")
    b = load_images(src, image_size=16, progress=False, cache_dir=tmp_path / "b", workers=1)
    assert a.images.shape == (60, 16, 16, 3) and a.channels == 3 and a.root is None
    assert a.source == src and a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert a.table.equals(b.table)
    assert int(a.table["rare"].sum()) == 6
    other_seed = load_images("builtin:shapes?n=60&seed=3&rare=0.1", image_size=16, progress=False)
    assert other_seed.fingerprint != a.fingerprint
    assert not np.array_equal(np.asarray(other_seed.images), np.asarray(a.images))
    # rows rendered through a filter are the same pixels as in the full set
    sub = load_images(src, image_size=16, where=["split=test"], progress=False, cache_dir=tmp_path / "a")
    rows = a.table.index[a.table["split"] == "test"].to_numpy()
    np.testing.assert_array_equal(np.asarray(sub.images), np.asarray(a.images[rows]))
    assert sub.table["path"].tolist() == a.table["path"].iloc[rows].tolist()


def test_default_parameters_share_the_cache_key():
    a = load_images("builtin:shapes", image_size=8, where=["group=white triangle"], progress=False)
    b = load_images("builtin:shapes?n=4000&rare=0.02&seed=0", image_size=8, where=["group=white triangle"],
                    progress=False)
    assert len(a) == 80 and a.fingerprint == b.fingerprint
    assert set(a.table["colour"]) == {"white"}


def _ink(img: np.ndarray) -> np.ndarray:
    """Mean colour of the pixels that belong to the shape (bright ones)."""
    px = img.reshape(-1, 3).astype(float)
    return px[px.max(1) > 140].mean(0)


def test_rendered_colours_and_shape_inside_frame():
    images, table = SHAPES(image_size=32, n=40, rare=0.25, seed=1)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    for img, colour in zip(images, table["colour"]):
        r, g, b = _ink(img)
        if colour == "red":
            assert r > 150 and g < 90 and b < 90
        elif colour == "green":
            assert g > 130 and r < 90 and b < 110
        elif colour == "blue":
            assert b > 160 and r < 90
        else:  # white
            assert r > 180 and g > 180 and b > 180
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert border.max() < 120  # dark background all around: the shape is fully inside
        assert img.reshape(-1, 3).max(1).mean() < 200  # mostly background
    # backgrounds vary from image to image (textured, not one flat colour)
    corners = images[:, :4, :4].reshape(40, -1).mean(1)
    assert corners.std() > 2
    assert images[0, :4, :4].std() > 0.5


def test_spurious_render_matches_table():
    images, table = SPURIOUS(image_size=32, n=20)
    for img, colour in zip(images, table["colour"]):
        r, g, b = _ink(img)
        assert (r > b) == (colour == "red")
    # rotation-invariant roundness: ink area / area of the circle around it (circle ~1, square 2/pi)
    def roundness(img):
        ys, xs = np.nonzero(img.max(2) > 140)
        r2 = ((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() + 0.5
        return len(ys) / (np.pi * r2)

    for img, label in zip(images, table["label"]):
        assert (roundness(img) > 0.8) == (label == "circle")


def test_builtin_greyscale_and_where():
    ds = load_images("builtin:spurious?n=40&corr=1", image_size=8, channels=1, where=["split=train"],
                     progress=False)
    assert ds.channels == 1 and ds.images.shape[1:] == (8, 8, 1)
    assert set(ds.table["group"]) == {"red circle", "blue square"}


def test_builtin_errors():
    with pytest.raises(DataError, match=r"unknown builtin dataset 'circles' \(valid: shapes, spurious\)"):
        load_images("builtin:circles", progress=False)
    with pytest.raises(DataError, match=r"unknown parameter corr for builtin:shapes \(valid: n, rare, seed\)"):
        load_images("builtin:shapes?corr=0.5", progress=False)
    with pytest.raises(DataError, match="must be an integer"):
        load_images("builtin:shapes?n=many", progress=False)
    with pytest.raises(DataError, match=r"must be in \[0, 1\]"):
        load_images("builtin:spurious?corr=1.5", progress=False)
    with pytest.raises(DataError, match="given twice"):
        load_images("builtin:spurious?n=5&n=6", progress=False)
