"""Atomic writes: all or nothing, and files readable like any other the user writes."""

from __future__ import annotations

import os
import stat

import pytest

from splitcem._io import atomic_write, write_json, write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = write_text(tmp_path / "a" / "f.txt", "one")
    write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in p.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = write_json(tmp_path / "m.json", {"x": 1})

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_text().strip() == '{\n  "x": 1\n}'
    assert [q.name for q in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_follow_the_umask_not_private(tmp_path):
    """mkstemp creates 0600 files; run outputs must be readable like a plain open()'s."""
    old = os.umask(0o022)
    try:
        p = write_text(tmp_path / "summary.md", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        q = write_text(tmp_path / "private.md", "x")
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)
