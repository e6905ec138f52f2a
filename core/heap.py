"""One start-up step for long-running processes: take the start-up heap out of the GC's way."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, classes, functions, settings) into the
    interpreter's permanent generation, out of the cyclic garbage collector's reach.

    They live as long as the process, yet every full collection would walk all of them: with
    the OpenAI client, FastAPI and pydantic imported that was a 35-100 ms pause every few
    seconds under load, the whole of the pipeline's p99 latency (docs/benchmarks.md). Call it
    once from a process entry point, after the start-up imports and before serving; not from
    library code or tests, whose garbage must stay collectable.
    """
    gc.collect()
    gc.freeze()
