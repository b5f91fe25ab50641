"""Named pipelines users pick with ``recipe="<name>"`` or ``--recipe <name>``.

Each preset is a function returning a fresh Recipe, so callers may edit what they get.
"""

from __future__ import annotations

from typing import Callable

from fxcompress.infra.recipe import PassStep, Recipe


def default() -> Recipe:
    """Lossless cleanup: outputs within fp32 noise, never more nodes."""
    return Recipe(
        name="default",
        description="lossless: remove no-ops and dead code",
        steps=[PassStep("remove-no-ops"), PassStep("eliminate-dead-code")],
        max_iterations=2,
    )


PRESETS: dict[str, Callable[[], Recipe]] = {"default": default}
