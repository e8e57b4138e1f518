"""dfget's early copy of the verified start of a daemon's file (L{dfget.EarlyCopy}).

Real files in a temporary directory; the daemon's reports are given by hand.
"""

from __future__ import annotations

import os
from typing import Any

from memhelpers import body

from dfly.dfget import EarlyCopy

DATA = body(300_000, seed=5)


def _files(tmp_path: Any, content: bytes = DATA) -> tuple[str, str]:
    src, dst = str(tmp_path / "data"), str(tmp_path / "out.part")
    with open(src, "wb") as f:
        f.write(content)
    open(dst, "wb").close()
    return src, dst


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_copies_in_steps_then_the_rest_at_the_end(tmp_path: Any) -> None:
    """Ready bytes are copied once a step has accumulated; finish copies only the tail."""
    src, dst = _files(tmp_path)
    early = EarlyCopy(dst, step=100_000)
    early.advance(src, 50_000, 1)
    assert early.copied == 0  # less than a step
    early.advance(src, 120_000, 1)
    assert early.copied == 120_000
    assert _read(dst) == DATA[:120_000]
    assert early.finish(src, len(DATA), 1)
    assert _read(dst) == DATA


def test_new_epoch_starts_over(tmp_path: Any) -> None:
    """When the daemon starts the task over (new epoch), what was copied is dropped."""
    src, dst = _files(tmp_path)
    early = EarlyCopy(dst, step=1)
    early.advance(src, 200_000, 1)
    new = body(len(DATA), seed=6)
    with open(src, "r+b") as f:
        f.write(new)
    early.advance(src, 10_000, 2)
    assert early.copied == 10_000 and os.path.getsize(dst) == 10_000
    assert early.finish(src, len(new), 2)
    assert _read(dst) == new


def test_replaced_file_starts_over(tmp_path: Any) -> None:
    """A different file at the same path (same epoch number) is not mixed with the old one."""
    src, dst = _files(tmp_path)
    early = EarlyCopy(dst, step=1)
    early.advance(src, 200_000, 1)
    new = body(len(DATA), seed=8)
    os.unlink(src)
    with open(src, "wb") as f:
        f.write(new)
    assert not early.finish(src, len(new), 1)  # the caller then copies the whole file


def test_nothing_reported_or_missing_file_means_a_full_copy(tmp_path: Any) -> None:
    """Without reports, or after an error, finish declines and leaves the full copy to the caller."""
    src, dst = _files(tmp_path)
    assert not EarlyCopy(dst).finish(src, len(DATA), None)
    early = EarlyCopy(dst, step=1)
    early.advance(str(tmp_path / "missing"), 1000, 1)
    assert early.broken
    early.advance(src, 1000, 1)
    assert early.copied == 0 and not early.finish(src, len(DATA), 1)


def test_file_shorter_than_reported_is_not_accepted(tmp_path: Any) -> None:
    """A data file shorter than the verified length makes finish decline."""
    src, dst = _files(tmp_path)
    early = EarlyCopy(dst, step=1)
    early.advance(src, 1000, 1)
    assert not early.finish(src, len(DATA) + 10, 1)
