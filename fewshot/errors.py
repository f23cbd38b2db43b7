"""Typed errors raised by the few-shot core."""


class FewShotError(Exception):
    """Base class for every error the core raises on bad input."""


class EpisodeError(FewShotError, ValueError):
    """A support or query set that cannot form a few-shot task (too few classes, bad labels)."""


class DatasetError(FewShotError, ValueError):
    """A dataset folder or zip that is missing, empty or not in a supported layout."""


class CheckpointError(FewShotError, ValueError):
    """A weights file or config that is missing, corrupt or does not match its architecture."""
