"""Data layer: sources, decoding, filtering, skipping bad files, the cache store."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import debias.data.sources as sources_mod
from debias.data import (
    BUILTIN_DATASETS,
    ImageDecodeError,
    ImageSet,
    cache_root,
    decode_image,
    load_images,
)
from debias.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION = Path("/usr/share/datasets/fashion-mnist")

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


# ------------------------------------------------------------------------------------------ helpers
def save(path: Path, colour=RED, size=(16, 16), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def noisy_jpeg_bytes(size=64, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    data = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def store_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


# ------------------------------------------------------------------------------------ folder sources
def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DEBIAS_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "debias"


def test_flat_folder(tmp_path, _isolated_cache_dir):
    save(tmp_path / "b.png", GREEN)
    save(tmp_path / "a.JPG", RED, size=(40, 20), fmt="JPEG")
    save(tmp_path / "c.bmp", BLUE)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_images(str(tmp_path), image_size=8, progress=False)
    assert isinstance(ds, ImageSet)
    assert list(ds.table.columns) == ["path"]  # no sub-folders -> no label
    assert ds.table["path"].tolist() == ["a.JPG", "b.png", "c.bmp"]
    assert isinstance(ds.table.index, pd.RangeIndex) and len(ds) == 3
    assert ds.images.shape == (3, 8, 8, 3) and ds.images.dtype == np.uint8
    assert isinstance(ds.images, np.memmap)
    assert ds.channels == 3 and ds.image_size == 8 and ds.root == tmp_path.resolve()
    assert ds.source == str(tmp_path)
    assert len(ds.fingerprint) == 16 and int(ds.fingerprint, 16) >= 0
    np.testing.assert_allclose(ds.images[0].reshape(-1, 3).mean(0), RED, atol=12)
    np.testing.assert_array_equal(ds.images[1].reshape(-1, 3).mean(0), GREEN)
    assert ds.skipped.empty and list(ds.skipped.columns) == ["path", "reason"]
    store = _isolated_cache_dir / ds.fingerprint
    assert sorted(p.name for p in store.iterdir()) == ["images.npy", "meta.json", "rows.parquet", "skipped.csv"]
    meta = json.loads((store / "meta.json").read_text())
    assert meta["n"] == 3 and meta["fingerprint"] == ds.fingerprint


def test_folder_with_class_subfolders(tmp_path):
    save(tmp_path / "dogs" / "x.png", RED)
    save(tmp_path / "cats" / "b.png", GREEN)
    save(tmp_path / "cats" / "deep" / "a.webp", BLUE, fmt="WEBP")
    ds = load_images(str(tmp_path), image_size=4, progress=False)
    assert ds.table["path"].tolist() == ["cats/b.png", "cats/deep/a.webp", "dogs/x.png"]
    assert ds.table["label"].tolist() == ["cats", "cats", "dogs"]
    only_dogs = load_images(str(tmp_path), image_size=4, where=["label=dogs"], progress=False)
    assert only_dogs.table["path"].tolist() == ["dogs/x.png"]


def test_mixed_depth_folder_has_no_label(tmp_path):
    save(tmp_path / "top.png")
    save(tmp_path / "sub" / "low.png")
    ds = load_images(str(tmp_path), image_size=4, progress=False)
    assert list(ds.table.columns) == ["path"]
    assert ds.table["path"].tolist() == ["sub/low.png", "top.png"]


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"^no such file or folder: .*nope$"):
        load_images(str(tmp_path / "nope"), progress=False)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"^no images found under .*empty$"):
        load_images(str(tmp_path / "empty"), progress=False)
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataError, match="cannot use"):
        load_images(str(tmp_path / "data.json"), progress=False)


# ---------------------------------------------------------------------------------- manifest sources
def _manifest_folder(tmp_path: Path) -> Path:
    save(tmp_path / "img" / "r.png", RED)
    save(tmp_path / "img" / "g.png", GREEN)
    save(tmp_path / "img" / "b.png", BLUE)
    return tmp_path


def test_csv_manifest_keeps_metadata(tmp_path):
    _manifest_folder(tmp_path)
    (tmp_path / "m.csv").write_text(
        "id,path,colour,age\n007,img/r.png,red,3\n8,img/g.png,green,4\n9,./img/b.png,blue,5\n"
    )
    ds = load_images(str(tmp_path / "m.csv"), image_size=4, progress=False)
    assert list(ds.table.columns) == ["path", "id", "colour", "age"]
    assert ds.table["path"].tolist() == ["img/r.png", "img/g.png", "./img/b.png"]  # as written
    assert ds.table["age"].tolist() == [3, 4, 5] and ds.table["id"].tolist() == [7, 8, 9]
    assert ds.root == tmp_path.resolve()
    np.testing.assert_array_equal(ds.images[2, 0, 0], BLUE)
    assert ds.channels == 3


def test_parquet_manifest_and_pq_suffix(tmp_path):
    _manifest_folder(tmp_path)
    df = pd.DataFrame({"path": ["img/g.png", "img/r.png"], "score": [0.5, 1.5], "ok": [True, False]})
    df.to_parquet(tmp_path / "m.parquet", index=False)
    ds = load_images(str(tmp_path / "m.parquet"), image_size=4, progress=False)
    assert list(ds.table.columns) == ["path", "score", "ok"]
    assert ds.table["score"].tolist() == [0.5, 1.5] and ds.table["ok"].tolist() == [True, False]
    np.testing.assert_array_equal(ds.images[0, 0, 0], GREEN)
    df.to_parquet(tmp_path / "m2.pq", index=False)
    ds2 = load_images(str(tmp_path / "m2.pq"), image_size=4, where=["ok=True"], progress=False)
    assert ds2.table["path"].tolist() == ["img/g.png"]


def test_manifest_absolute_paths(tmp_path):
    imgs = _manifest_folder(tmp_path / "elsewhere") / "img"
    man = tmp_path / "lists" / "m.csv"
    man.parent.mkdir()
    pd.DataFrame({"path": [str(imgs / "b.png"), str(imgs / "r.png")], "k": ["b", "r"]}).to_csv(man, index=False)
    ds = load_images(str(man), image_size=4, progress=False)
    assert ds.table["path"].tolist() == [str(imgs / "b.png"), str(imgs / "r.png")]
    np.testing.assert_array_equal(ds.images[:, 0, 0], [BLUE, RED])


def test_manifest_missing_file_is_skipped(tmp_path, capsys):
    _manifest_folder(tmp_path)
    (tmp_path / "m.csv").write_text("path,y\nimg/r.png,1\nimg/gone.png,2\nimg/b.png,3\n")
    ds = load_images(str(tmp_path / "m.csv"), image_size=4, progress=False)
    assert len(ds) == 2 and ds.table["y"].tolist() == [1, 3]
    assert ds.skipped.to_dict("records") == [{"path": "img/gone.png", "reason": "file not found"}]
    assert "skipped img/gone.png: file not found" in capsys.readouterr().err


def test_manifest_errors(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError) as e:
        load_images(str(tmp_path / "nopath.csv"), progress=False)
    assert str(e.value) == f"manifest {(tmp_path / 'nopath.csv').resolve()} has no 'path' column (columns: file, label)"
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"^cannot read manifest .*bad\.parquet: ") as e:
        load_images(str(tmp_path / "bad.parquet"), progress=False)
    assert "\n" not in str(e.value)
    (tmp_path / "empty.csv").write_text("path,x\n")
    with pytest.raises(DataError, match="no rows"):
        load_images(str(tmp_path / "empty.csv"), progress=False)


# ---------------------------------------------------------------------------------------------- where
def _where_source(tmp_path: Path) -> str:
    rows = []
    for i, (colour, split) in enumerate([("red", "train"), ("green", "train"), ("blue", "test"), ("red", "test")]):
        save(tmp_path / f"{i}.png", {"red": RED, "green": GREEN, "blue": BLUE}[colour])
        rows.append({"path": f"{i}.png", "colour": colour, "split": split, "n": i})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return str(tmp_path / "m.csv")


def test_where_or_and(tmp_path):
    src = _where_source(tmp_path)
    both = load_images(src, where=["colour=red", "colour=green"], image_size=4, progress=False)
    assert both.table["path"].tolist() == ["0.png", "1.png", "3.png"]
    anded = load_images(src, where=["colour=red", "colour=blue", "split=test"], image_size=4, progress=False)
    assert anded.table["path"].tolist() == ["2.png", "3.png"]
    assert anded.table.index.tolist() == [0, 1]
    by_int = load_images(src, where=["n=3"], image_size=4, progress=False)
    assert by_int.table["colour"].tolist() == ["red"]
    np.testing.assert_array_equal(by_int.images[0, 0, 0], RED)


def test_where_errors(tmp_path):
    src = _where_source(tmp_path)
    with pytest.raises(DataError) as e:
        load_images(src, where=["shade=red"], progress=False)
    assert str(e.value) == "unknown column 'shade' in --where (available: path, colour, split, n)"
    with pytest.raises(DataError, match="expected COLUMN=VALUE"):
        load_images(src, where=["colour"], progress=False)
    with pytest.raises(DataError, match="no rows left"):
        load_images(src, where=["colour=purple"], progress=False)


def test_where_filters_before_decoding(tmp_path, monkeypatch):
    src = _where_source(tmp_path)
    seen: list[str] = []
    real = sources_mod.decode_image

    def spy(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(sources_mod, "decode_image", spy)
    load_images(src, where=["split=test"], image_size=4, progress=False, workers=1)
    assert sorted(seen) == ["2.png", "3.png"]


# ------------------------------------------------------------------------------------------------ idx
def _idx_folder(tmp_path: Path, dot_names: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 6, 6), dtype=np.uint8)
    sep = "." if dot_names else "-"
    write_idx(tmp_path / f"train-images{sep}idx3-ubyte", train)
    write_idx(tmp_path / f"train-labels{sep}idx1-ubyte", np.array([0, 1, 2, 3, 4], np.uint8))
    write_idx(tmp_path / f"t10k-images{sep}idx3-ubyte.gz", test)
    write_idx(tmp_path / f"t10k-labels{sep}idx1-ubyte.gz", np.array([7, 8, 9], np.uint8))
    return tmp_path, train, test


@pytest.mark.parametrize("dot_names", [False, True])
def test_idx_folder_plain_and_gz(tmp_path, dot_names):
    folder, train, test = _idx_folder(tmp_path, dot_names)
    ds = load_images(str(folder), image_size=6, progress=False)
    assert ds.channels == 1 and ds.images.shape == (8, 6, 6, 1)
    assert list(ds.table.columns) == ["path", "label", "split"]
    assert ds.table["split"].tolist() == ["train"] * 5 + ["test"] * 3
    assert ds.table["label"].tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert ds.table["label"].dtype.kind == "i"
    sep = "." if dot_names else "-"
    assert ds.table["path"].iloc[6] == f"t10k-images{sep}idx3-ubyte.gz#1"
    np.testing.assert_array_equal(ds.images[:5, :, :, 0], train)
    np.testing.assert_array_equal(ds.images[5:, :, :, 0], test)
    only = load_images(str(folder), image_size=12, channels=3, where=["split=test", "label=9"], progress=False)
    assert only.images.shape == (1, 12, 12, 3) and only.table["path"].tolist()[0].endswith("#2")
    np.testing.assert_array_equal(only.images[0, :, :, 0], only.images[0, :, :, 2])


def test_idx_truncated_images_are_skipped(tmp_path):
    imgs = np.full((4, 5, 5), 9, np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 4, 5, 5) + imgs.tobytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])  # last image incomplete
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    ds = load_images(str(tmp_path), image_size=5, progress=False)
    assert len(ds) == 3 and ds.skipped["path"].tolist() == ["train-images-idx3-ubyte#3"]
    assert "truncated" in ds.skipped["reason"].iloc[0]


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="shared MNIST data not present")
def test_shared_mnist_t10k():
    ds = load_images(str(SHARED / "mnist"), image_size=28, where=["label=0", "label=1"], progress=False)
    assert set(ds.table["split"]) == {"test"}
    assert len(ds) == 980 + 1135  # MNIST test set: 980 zeros, 1135 ones
    assert ds.table["path"].iloc[0].startswith("t10k-images-idx3-ubyte.gz#")
    assert ds.images.shape[1:] == (28, 28, 1) and ds.images.max() == 255


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_layout():
    ds = load_images(str(FASHION), image_size=28, where=["split=test", "label=9"], progress=False)
    assert len(ds) == 1000 and ds.channels == 1
    full = sources_mod.resolve_source(str(FASHION)).table
    assert full["split"].value_counts().to_dict() == {"train": 60000, "test": 10000}


# -------------------------------------------------------------------------------------- decode_image
def test_decode_image_from_bytes_and_errors(tmp_path):
    img = Image.new("RGB", (30, 10), GREEN)
    img.paste(Image.new("RGB", (10, 10), RED), (10, 0))  # the centre square is red
    out = decode_image(png_bytes(img), 5, 3)
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2, 2], RED)
    np.testing.assert_array_equal(out.reshape(-1, 3).min(0), out.reshape(-1, 3).max(0))  # no green
    grey = decode_image(png_bytes(img), 5, 1)
    assert grey.shape == (5, 5, 1)
    cases = {
        b"": "empty file",
        b"definitely not an image" * 5: "not an image (cannot identify format)",
        noisy_jpeg_bytes()[:1500]: "truncated image data",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageDecodeError) as e:
            decode_image(data, 8, 3)
        assert e.value.reason == reason and isinstance(e.value, DataError)
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "missing.png", 8, 3)
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(str(tmp_path / "zero.png"), 8, 3)


def test_decode_image_max_pixels(tmp_path):
    path = save(tmp_path / "big.png", size=(40, 30))
    assert decode_image(path, 8, 3, max_pixels=1200).shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError, match=r"image too large \(40x30 = 1200 pixels, limit 1199\)"):
        decode_image(path, 8, 3, max_pixels=1199)


def test_decode_jpeg_draft_large_non_square():
    img = Image.new("RGB", (800, 400), GREEN)
    img.paste(Image.new("RGB", (400, 400), BLUE), (200, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    out = decode_image(buf.getvalue(), 16, 3)
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), BLUE, atol=8)  # green sides cropped away


@pytest.mark.parametrize(
    "make, expect",
    [
        # palette with a transparent index: transparent pixels become white
        (lambda: _palette_with_transparency(), {(0, 0): (255, 255, 255), (7, 7): RED}),
        (lambda: _rgba_half_transparent(), {(0, 0): (255, 255, 255), (7, 7): BLUE}),
        (lambda: Image.new("LA", (8, 8), (50, 255)), {(3, 3): (50, 50, 50)}),
        (lambda: Image.new("1", (8, 8), 1), {(3, 3): (255, 255, 255)}),
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), {(3, 3): (255, 0, 0)}),
        (lambda: Image.new("I;16", (8, 8), 65535), {(3, 3): (255, 255, 255)}),
        (lambda: Image.new("I;16", (8, 8), 257 * 100), {(3, 3): (100, 100, 100)}),
        (lambda: Image.new("F", (8, 8), 0.5), {(3, 3): (128, 128, 128)}),
    ],
)
def test_decode_odd_modes(make, expect):
    img = make()
    fmt = "TIFF" if img.mode in ("CMYK", "I;16", "F") else "PNG"
    buf = io.BytesIO()
    img.save(buf, fmt)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == img.mode  # the odd mode survives the file
    out = decode_image(buf.getvalue(), 8, 3)
    assert out.shape == (8, 8, 3)
    for (y, x), rgb in expect.items():
        np.testing.assert_allclose(out[y, x], rgb, atol=2)
    g = decode_image(buf.getvalue(), 8, 1)
    assert g.shape == (8, 8, 1)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (4, 4, 8, 8))
    img.info["transparency"] = 0
    return img


def _rgba_half_transparent() -> Image.Image:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.paste((*BLUE, 255), (4, 4, 8, 8))
    return img


# ------------------------------------------------------------------------------------------ channels
def test_channel_auto_detection(tmp_path):
    save(tmp_path / "grey" / "a.png", 30, mode="L")
    save(tmp_path / "grey" / "b.png", 200, mode="L")
    ds = load_images(str(tmp_path / "grey"), image_size=4, progress=False)
    assert ds.channels == 1 and ds.images.shape == (2, 4, 4, 1)
    assert ds.images[1].min() == 200
    rgb = load_images(str(tmp_path / "grey"), image_size=4, channels=3, progress=False)
    assert rgb.channels == 3 and rgb.fingerprint != ds.fingerprint
    np.testing.assert_array_equal(rgb.images[0, 0, 0], [30, 30, 30])
    # first file unreadable, the first readable one (16-bit greyscale) decides
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "0.png").write_bytes(b"junk")
    Image.new("I;16", (6, 6), 65535).save(tmp_path / "mixed" / "1.tif")
    save(tmp_path / "mixed" / "2.png", RED)
    mixed = load_images(str(tmp_path / "mixed"), image_size=4, progress=False)
    assert mixed.channels == 1 and len(mixed) == 2
    assert mixed.images[0].min() == 255 and mixed.images[1, 0, 0, 0] == round(0.299 * 220 + 0.587 * 20 + 0.114 * 20)
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_images(str(tmp_path / "grey"), channels=2, progress=False)


# ------------------------------------------------------------------------------------------ bad files
def test_bad_files_are_reported_skipped_and_counted(tmp_path, capsys):
    save(tmp_path / "good1.png", RED)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(512))
    (tmp_path / "half.jpg").write_bytes(noisy_jpeg_bytes()[:1500])
    save(tmp_path / "good2.jpg", BLUE, fmt="JPEG")
    ds = load_images(str(tmp_path), image_size=4, progress=False)
    assert ds.table["path"].tolist() == ["good1.png", "good2.jpg"]
    assert ds.images.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(ds.images[1, 0, 0], BLUE, atol=10)
    reasons = dict(zip(ds.skipped["path"], ds.skipped["reason"]))
    assert reasons == {
        "empty.png": "empty file",
        "garbage.jpg": "not an image (cannot identify format)",
        "half.jpg": "truncated image data",
    }
    err = capsys.readouterr().err
    assert "skipped empty.png: empty file" in err and "skipped half.jpg: truncated image data" in err
    # the shrunken store reads back with exactly the kept rows
    store = Path(os.environ["DEBIAS_CACHE_DIR"]) / ds.fingerprint
    assert np.load(store / "images.npy").shape == (2, 4, 4, 3)
    assert json.loads((store / "meta.json").read_text())["n_skipped"] == 3


def test_skip_report_is_capped(tmp_path, capsys):
    save(tmp_path / "ok.png")
    for i in range(23):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"x")
    ds = load_images(str(tmp_path), image_size=4, progress=False)
    assert len(ds) == 1 and len(ds.skipped) == 23
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert sum(line.startswith("skipped ") for line in lines) == 20
    assert "... and 3 more" in lines


def test_all_bad_raises(tmp_path, _isolated_cache_dir):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"^none of the 2 images could be read \(first: a\.png: empty file\)$"):
        load_images(str(tmp_path), image_size=4, progress=False)
    assert store_dirs(_isolated_cache_dir) == []
    assert not [p for p in _isolated_cache_dir.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------- cache
def test_second_load_decodes_nothing(tmp_path, monkeypatch, _isolated_cache_dir):
    save(tmp_path / "a.png", RED)
    save(tmp_path / "b.png", GREEN)
    first = load_images(str(tmp_path), image_size=6, progress=False)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(sources_mod, "decode_image", boom)
    again = load_images(str(tmp_path), image_size=6, progress=False)
    assert again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
    pd.testing.assert_frame_equal(again.table, first.table)
    assert len(store_dirs(_isolated_cache_dir)) == 1
    # the patch is live: a new size has to decode, and every decode fails
    with pytest.raises(DataError, match="none of the 2 images"):
        load_images(str(tmp_path), image_size=7, progress=False)


def test_cache_key_tracks_content_where_size(tmp_path):
    save(tmp_path / "a.png", RED)
    save(tmp_path / "b.png", GREEN)
    pd.DataFrame({"path": ["a.png", "b.png"], "k": ["x", "y"]}).to_csv(tmp_path / "m.csv", index=False)
    base = load_images(str(tmp_path), image_size=4, progress=False)
    assert load_images(str(tmp_path), image_size=5, progress=False).fingerprint != base.fingerprint
    man = load_images(str(tmp_path / "m.csv"), image_size=4, progress=False)
    man_where = load_images(str(tmp_path / "m.csv"), image_size=4, where=["k=x"], progress=False)
    assert len({base.fingerprint, man.fingerprint, man_where.fingerprint}) == 3
    # where items are order-insensitive
    w1 = load_images(str(tmp_path / "m.csv"), image_size=4, where=["k=x", "k=y"], progress=False)
    w2 = load_images(str(tmp_path / "m.csv"), image_size=4, where=["k=y", "k=x"], progress=False)
    assert w1.fingerprint == w2.fingerprint
    # change a file: new size and mtime -> new key and the new pixels
    save(tmp_path / "a.png", BLUE, size=(20, 20))
    st = os.stat(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    changed = load_images(str(tmp_path), image_size=4, progress=False)
    assert changed.fingerprint != base.fingerprint
    np.testing.assert_array_equal(changed.images[0, 0, 0], BLUE)
    man2 = load_images(str(tmp_path / "m.csv"), image_size=4, progress=False)
    assert man2.fingerprint != man.fingerprint
    # editing the manifest itself changes the key too
    (tmp_path / "m.csv").write_text("path,k\na.png,z\nb.png,y\n")
    man3 = load_images(str(tmp_path / "m.csv"), image_size=4, progress=False)
    assert man3.fingerprint != man2.fingerprint and man3.table["k"].tolist() == ["z", "y"]


def test_crash_mid_build_leaves_no_store(tmp_path, monkeypatch, _isolated_cache_dir):
    for i in range(6):
        save(tmp_path / f"{i}.png")

    class Crash(BaseException):
        pass

    real = sources_mod.decode_image
    calls = {"n": 0}

    def crash_on_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash()
        return real(*a, **k)

    monkeypatch.setattr(sources_mod, "decode_image", crash_on_fourth)
    with pytest.raises(Crash):
        load_images(str(tmp_path), image_size=4, progress=False, workers=1)
    assert store_dirs(_isolated_cache_dir) == []
    assert not [p for p in _isolated_cache_dir.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(sources_mod, "decode_image", real)
    assert len(load_images(str(tmp_path), image_size=4, progress=False)) == 6


def test_incomplete_store_is_rebuilt(tmp_path, _isolated_cache_dir):
    save(tmp_path / "a.png", RED)
    ds = load_images(str(tmp_path), image_size=4, progress=False)
    (_isolated_cache_dir / ds.fingerprint / "meta.json").unlink()  # as if a builder died before the end
    again = load_images(str(tmp_path), image_size=4, progress=False)
    assert again.fingerprint == ds.fingerprint and len(again) == 1
    assert (_isolated_cache_dir / ds.fingerprint / "meta.json").is_file()


def test_concurrent_builders(tmp_path, _isolated_cache_dir):
    for i in range(12):
        save(tmp_path / f"{i:02d}.png", (i * 20, 0, 0))
    results: list[ImageSet] = []
    errors: list[BaseException] = []

    def go():
        try:
            results.append(load_images(str(tmp_path), image_size=4, progress=False, workers=1))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert len({r.fingerprint for r in results}) == 1
    for r in results:
        np.testing.assert_array_equal(r.images[:, 0, 0, 0], [i * 20 for i in range(12)])
    assert len(store_dirs(_isolated_cache_dir)) == 1
    assert not [p for p in _isolated_cache_dir.iterdir() if ".tmp-" in p.name]


def test_cache_dir_argument(tmp_path, _isolated_cache_dir):
    save(tmp_path / "img" / "a.png")
    ds = load_images(str(tmp_path / "img"), image_size=4, cache_dir=tmp_path / "mycache", progress=True)
    assert (tmp_path / "mycache" / ds.fingerprint / "meta.json").is_file()
    assert store_dirs(_isolated_cache_dir) == []


# -------------------------------------------------------------------------------------------- ImageSet
def test_batch_and_subset(tmp_path):
    colours = [RED, GREEN, BLUE, (255, 255, 255)]
    for i, c in enumerate(colours):
        save(tmp_path / f"{i}.png", c)
    ds = load_images(str(tmp_path), image_size=4, progress=False)
    b = ds.batch(np.array([3, 0]))
    assert b.dtype == torch.float32 and tuple(b.shape) == (2, 3, 4, 4) and b.is_contiguous()
    assert torch.allclose(b[0], torch.ones(3, 4, 4)) and float(b[1, 0, 0, 0]) == pytest.approx(220 / 255)
    assert tuple(ds.batch(slice(1, 3)).shape) == (2, 3, 4, 4)
    sub = ds.subset(np.array([2, 1]))
    assert len(sub) == 2 and sub.table["path"].tolist() == ["2.png", "1.png"]
    assert list(sub.table.index) == [0, 1] and sub.fingerprint != ds.fingerprint
    np.testing.assert_array_equal(sub.images[0, 0, 0], BLUE)
    masked = ds.subset(ds.table["path"].isin(["0.png", "3.png"]).to_numpy())
    assert masked.table["path"].tolist() == ["0.png", "3.png"]
    assert masked.channels == 3 and masked.image_size == 4 and masked.root == ds.root
    assert float(masked.batch(np.array([1])).min()) == 1.0


def test_builtin_registry_is_exported():
    assert {"shapes", "spurious"} <= set(BUILTIN_DATASETS)
    assert all(callable(v) for v in BUILTIN_DATASETS.values())


def test_duplicate_manifest_paths_are_kept_with_one_warning(tmp_path, capsys):
    from debias.data import load_images

    img = np.zeros((8, 8, 3), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(img).save(tmp_path / name)
    pd.DataFrame({"path": ["a.png", "b.png", "a.png", "a.png"]}).to_csv(tmp_path / "m.csv", index=False)
    data = load_images(str(tmp_path / "m.csv"), image_size=32, progress=False, cache_dir=tmp_path / "cache")
    assert len(data) == 4  # kept: duplicating rows may be deliberate oversampling
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "2 rows repeat a path" in err and "a.png" in err
