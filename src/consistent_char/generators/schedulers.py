"""Diffusers schedulers by class name, for the generator's ``scheduler`` setting."""

from __future__ import annotations

from typing import Any

__all__ = ["scheduler_class"]


def scheduler_class(name: str | None) -> Any:
    """The diffusers scheduler class called `name` (``None`` stays ``None``).

    Raises:
        ValueError: `name` is not a diffusers scheduler class.

    Example:
        >>> scheduler_class("EulerDiscreteScheduler").__name__
        'EulerDiscreteScheduler'
    """
    if name is None:
        return None
    import diffusers
    from diffusers import SchedulerMixin

    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise ValueError(
            "not a diffusers scheduler class; use null (the model's own) or a class name such "
            "as 'EulerAncestralDiscreteScheduler' or 'DPMSolverMultistepScheduler'"
        )
    return found
