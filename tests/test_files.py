"""Atomic writes: the target holds the old content or the whole new one, never a part."""

from __future__ import annotations

import json

import pytest

from qst_jax.files import write_atomic, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old, and longer than the new content")
    write_json_atomic(target, {"step": 3}, indent=2)
    assert json.loads(target.read_text()) == {"step": 3}
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "side.safetensors"
    target.write_bytes(b"old")
    seen = []

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"ne")
        seen.append(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert seen and seen[0] != str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["side.safetensors"]
