"""The service's one door to the ML core: the names of `fewshot.serving`, imported on first use.

Start-up never imports torch (the CLI answers `--help` in ~0.1 s and the API process loads the
core when it first needs it), so the names resolve lazily through a module `__getattr__`
(PEP 562): `ml.adapt_fast(...)` imports fewshot on its first call. Type checkers see the real
names. No other module of the service imports `fewshot` (tests/test_import_graph.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fewshot.serving import *  # noqa: F403
else:

    def __getattr__(name: str) -> Any:
        from fewshot import serving

        if name not in serving.__all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(serving, name)
        globals()[name] = value
        return value
