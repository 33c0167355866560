"""Atomic output files: their mode."""

import torch


def test_atomic_writes_respect_the_umask(tmp_path):
    """Run files used to be written 0600 (mkstemp); now they get 0666 minus the umask, as a plain open() would."""
    import os
    import stat

    from debias.runtime.checkpoint import atomic_write_text, save_checkpoint, write_json

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


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writers_are_removed_on_the_next_write(tmp_path):
    """A kill during an atomic write leaves .NAME.PID.*.tmp; the next write of NAME removes it when PID is gone, and
    leaves the temporary files of live processes alone."""
    import os

    from debias.runtime.checkpoint import save_checkpoint

    dead, live = _dead_pid(), 1  # pid 1 always exists
    stale = tmp_path / f".checkpoint.pt.{dead}.abcd.tmp"
    busy = tmp_path / f".checkpoint.pt.{live}.efgh.tmp"
    other = tmp_path / f".model.pt.{dead}.ijkl.tmp"
    for p in (stale, busy, other):
        p.write_bytes(b"partial")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    assert not stale.exists() and busy.exists() and other.exists()  # only leftovers of the file being written
    assert not [p for p in tmp_path.iterdir() if str(os.getpid()) in p.name]  # its own temporary file is gone too


def test_cache_build_folders_of_dead_builders_are_removed(tmp_path):
    from debias.data.cache import _remove_stale

    dead = tmp_path / f".abc123.tmp-{_dead_pid()}-0000"
    live = tmp_path / ".abc123.tmp-1-1111"
    for d in (dead, live):
        d.mkdir()
        (d / "images.npy").write_bytes(b"x")
    _remove_stale(tmp_path, "abc123")
    assert not dead.exists() and live.exists()
