"""Error types users see.

Every error fxcompress raises on bad input is a subclass of :class:`FxCompressError` whose
message is one paragraph: what is wrong, where, and how to fix it. Internal stack frames are
suppressed (``raise ... from None``) unless they are the user's own code, because a wall of
torch internals does not tell a user what to change.
"""

from __future__ import annotations


class FxCompressError(Exception):
    """Base class: a problem the user can fix, described in one paragraph."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")


class InputError(FxCompressError):
    """Example inputs, calibration data or runtime feeds that do not fit the model."""


class CaptureError(FxCompressError):
    """The model could not be captured as a torch.fx graph."""


class RecipeError(FxCompressError):
    """A recipe names an unknown pass or option, or gives an option a wrong value."""


class PassError(FxCompressError):
    """A pass raised or left a broken graph; carries the pass name and those run before it."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: str, fix: str | None = None):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        problem = f"Pass '{pass_name}' failed after {self.ran_before}: {cause}"
        super().__init__(
            problem,
            fix
            or "remove the pass from the recipe (or skip it with its options) and report the "
            "model that triggers it; the graph from before this pass was kept.",
        )


class DriftError(FxCompressError):
    """A result drifted from the original model's outputs beyond the allowed tolerance."""


class ExportError(FxCompressError):
    """ONNX export, checking or writing failed."""


class ModelFileError(FxCompressError):
    """A model file is missing, corrupt, truncated, oversized or unsafe to load."""


class UntrustedFileError(ModelFileError):
    """Loading the file would run arbitrary code (pickle) and the user did not say they trust it."""


class RuntimeProviderError(FxCompressError):
    """ONNX Runtime could not create a session with the requested execution provider."""
