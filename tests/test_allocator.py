"""The process-wide allocator setting the CLI makes (debias.runtime.allocator)."""


def test_retain_freed_memory_sets_glibc_thresholds_unless_told_not_to(monkeypatch):
    """Issue 17: the CLI raises glibc's mmap/trim thresholds (large activations stop page-faulting fresh maps every
    step); DEBIAS_MALLOC_TUNING=0 or the user's own glibc knobs leave the allocator alone."""
    import platform
    import sys

    from debias.runtime.allocator import retain_freed_memory

    for knob in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "DEBIAS_MALLOC_TUNING"):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("DEBIAS_MALLOC_TUNING", "0")
    assert retain_freed_memory() is False
    monkeypatch.delenv("DEBIAS_MALLOC_TUNING")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert retain_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is glibc
