"""Atomic output files: their mode."""

import torch


def test_atomic_writes_respect_the_umask(tmp_path):
    """Run files used to be written 0600 (mkstemp); now they get 0666 minus the umask, as a plain open() would."""
    import os
    import stat

    from debias.checkpoint import atomic_write_text, save_checkpoint, write_json

    old = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "summary.json")
        save_checkpoint({"w": torch.zeros(2)}, tmp_path / "model.pt")
        atomic_write_text("x", tmp_path / "report.html")
        os.umask(0o077)
        write_json({"a": 1}, tmp_path / "private.json")
    finally:
        os.umask(old)
    for name in ("summary.json", "model.pt", "report.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
