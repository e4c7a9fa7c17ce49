"""The garbage collector in a serving process: freeze what startup left, so collections skip it.

CPython's full (generation 2) collection walks every tracked object. Once a model, torch,
transformers and the tokenizer are loaded, that is hundreds of thousands of objects, and a full
collection triggered by request churn stops whichever thread allocates: often the engine loop,
between two GPU steps, so every running stream sees the pause in its inter-token latency.
`benchmarks/bench_engine_host.py` measured one full collection at 122 ms over 330,000 objects
(the tokenizer, torch and transformers) on the 2-core CI machine, and 0 ms once they were frozen;
one that came during a run of 256 streams took 133 ms (BENCHMARKS.md, engine host time).

`gc.freeze()` moves every object alive now into a permanent generation that collections ignore;
what requests allocate later is still collected as usual.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect the loading's garbage, then freeze the rest. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
