"""The default local model's file: the shipped Q4_1 weights, stored once as Q8_0."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from worker.backends.model_file import copy_path, default_model_path, shipped_model_path

pytestmark = pytest.mark.slow

#: llama.cpp's `general.file_type` for LLAMA_FTYPE_MOSTLY_Q8_0 and _Q4_1.
Q8_0, Q4_1 = "7", "3"


def file_type(path: Path) -> str:
    """The GGUF's own word for its weights' type (only the vocabulary is loaded)."""
    import llama_cpp
    from llama_cpp import _internals

    internals: Any = _internals
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        return str(model.metadata()["general.file_type"])
    finally:
        model.close()


def test_the_wheel_ships_the_q4_1_file() -> None:
    path = shipped_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert file_type(path) == Q4_1


def test_the_default_model_is_the_shipped_one_stored_once_as_q8_0(tmp_path: Path) -> None:
    path = default_model_path(tmp_path)
    assert path.parent == tmp_path
    assert file_type(path) == Q8_0
    assert path.stat().st_size > shipped_model_path().stat().st_size
    made = path.stat().st_mtime_ns
    assert default_model_path(tmp_path) == path
    assert path.stat().st_mtime_ns == made  # found, not made again
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left


def test_a_cache_that_cannot_be_written_loads_the_shipped_file_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="worker.backends.model_file"):
        path = default_model_path(blocker / "models")
    assert path == shipped_model_path()
    assert any("LOCAL_MODEL_CACHE" in r.getMessage() for r in caplog.records)


def test_a_new_version_of_the_shipped_file_gets_a_copy_of_its_own(tmp_path: Path) -> None:
    source = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source.write_bytes(b"GGUF")
    first = copy_path(source, tmp_path / "cache")
    assert first.name.startswith("SmolLM2-135M-Instruct.Q8_0.")
    os.utime(source, ns=(0, 10**18))
    assert copy_path(source, tmp_path / "cache") != first


def test_a_new_copy_removes_what_earlier_ones_left_behind(tmp_path: Path) -> None:
    """A copy of an older wheel's file and a partial file from a worker killed while writing
    (145 MB each) are deleted once the new copy is made; a partial file young enough to be
    another worker's, still writing, is left alone, and so are files that are not copies."""
    target = copy_path(shipped_model_path(), tmp_path)
    stem = target.name.split(".Q8_0.")[0]
    old_copy = tmp_path / f"{stem}.Q8_0.1234-5678.gguf"
    stale = tmp_path / f".{target.name}.99999.partial"
    writing = tmp_path / f".{target.name}.99998.partial"
    unrelated = tmp_path / "other-model.gguf"
    for path in (old_copy, stale, writing, unrelated):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert default_model_path(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, writing.name, unrelated.name]
    )
