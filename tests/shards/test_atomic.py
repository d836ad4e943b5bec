"""shards.atomic: a reader sees the old file or the new one, never a part, and a failed write leaves nothing."""

from __future__ import annotations

import os

import pytest

from shards.atomic import atomic_path, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "deep" / "config.json"
    write_atomic(target, '{"v": 1}')
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b'{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"v": 1}'
    assert sorted(os.listdir(target.parent)) == ["config.json"]


def test_a_finished_write_replaces_the_file_and_the_temp_is_beside_it(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_path(target, tag="run1") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".run1.tmp")
        assert target.read_text() == "old"  # not replaced before the block ends
        with open(tmp, "w") as fh:
            fh.write("new")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
