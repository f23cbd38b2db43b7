"""How many intra-op threads torch uses in each thread that runs model code.

Torch's CPU kernels parallelise over an OpenMP team that belongs to the *calling* thread. The
service runs model code on several threads (adapt jobs on the executor, predictions on request
threads, the start-up warm-up); with torch's default of one thread per core each of them grows a
team of its own, and on a small box those teams contend for the same cores: measured on 2 cores,
`fewshot.adapt` (5-way 1-shot, Conv4) took ~45 ms in a job thread once another thread had used
torch, instead of ~20 ms. One intra-op thread per serving thread avoids the contention
(parallelism comes from concurrent requests and jobs instead). A lone thread with two would be
~15-30% faster on an idle 2-core box (adapt ~13 vs ~15 ms, a batch of 32 ~3.5 vs ~5 ms), but
only while no other thread has used torch. `MAML_SERVE_TORCH_THREADS` overrides the count.

Meta-training is one long job on its own thread and keeps torch's default (or the setting).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_torch_default: int | None = None

# Intra-op threads of a serving thread (adapt job, prediction, warm-up) when no setting is given.
SERVING_DEFAULT = 1


def torch_default() -> int:
    """Torch's own default thread count, read once before this module changes anything."""
    global _torch_default
    with _lock:
        if _torch_default is None:
            import torch

            _torch_default = torch.get_num_threads()
        return _torch_default


def serving_threads(configured: int | None) -> int:
    """Intra-op threads for adaptation and prediction: the setting, else one."""
    return configured if configured is not None else SERVING_DEFAULT


def training_threads(configured: int | None) -> int:
    """Intra-op threads for meta-training: the setting, else torch's default."""
    return configured if configured is not None else torch_default()


def use_threads(count: int) -> None:
    """Give the calling thread `count` intra-op threads (a no-op when it already has them)."""
    torch_default()
    import torch

    if torch.get_num_threads() != count:
        # Sets the calling thread's OpenMP team size (and torch's default for new threads).
        torch.set_num_threads(count)
