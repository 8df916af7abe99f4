"""Exceptions -> whether they are a user's error (clear message, exit 1) or a bug (traceback)."""

from __future__ import annotations


def user_error(e: BaseException) -> bool:
    """True for the stages' own error types, which carry a message meant for the user."""
    from usae.pipeline.store import StoreError

    kinds: list[type] = [StoreError, FileNotFoundError]
    for mod, names in (
        ("usae.pipeline.extract", ("ExtractError",)),
        ("usae.pipeline.registry", ("RegistryError", "WeightsUnavailable")),
        ("usae.trainer.train", ("TrainError",)),
        ("usae.analysis.report", ("AnalyzeError",)),
        ("usae.analysis.maximize", ("MaximizeError",)),
    ):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        kinds.extend(getattr(m, n) for n in names if hasattr(m, n))
    return isinstance(e, tuple(kinds))
