"""Learning-rate schedules as LambdaLR factor functions (multiplied into each group's lr).

SlotContrast's schedule: linear warm-up from 0 to the base rate over ``warmup_steps`` (videosaur's
``min(1, step / warmup_steps)``), then
exponential decay that halves the rate by ``max_steps``:
``0.5 ** ((step - warmup) / (max_steps - warmup))``.

``final_factor`` (default 0.5, SlotContrast's) is the factor the decay reaches at ``max_steps``:
a short run that should end on a settled model can anneal further (0.01 ends at 1 % of the rate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def warmup_exp_decay(
    step: int, warmup_steps: int, max_steps: int, decay: bool = True, final_factor: float = 0.5
) -> float:
    """The lr factor at optimizer step ``step`` (0-based: the factor used for the step's update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps  # as videosaur/SlotContrast: 0 at step 0
    if not decay:
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    return final_factor ** ((step - warmup_steps) / decay_steps)


def lr_factor(
    warmup_steps: int, max_steps: int, decay: bool = True, final_factor: float = 0.5
) -> Callable[[int], float]:
    """A picklable ``step -> factor`` function for ``torch.optim.lr_scheduler.LambdaLR``."""
    if warmup_steps < 0 or max_steps < 1:
        raise ValueError(
            f"need warmup_steps >= 0 and max_steps >= 1 (got {warmup_steps}, {max_steps})"
        )
    if not 0 < final_factor <= 1:
        raise ValueError(f"need 0 < final_factor <= 1 (got {final_factor})")
    return functools.partial(
        warmup_exp_decay,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        decay=decay,
        final_factor=final_factor,
    )
