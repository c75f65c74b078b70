"""GRACE's import path for its helper: ``from grace_dl.torch.helper import grace_from_params``
keeps working. The function is :func:`grace_dl.torch.grace_from_params` (GRACE's keys,
names and defaults; see :func:`grace_dl.registry.grace_from_params`)."""

from . import grace_from_params

__all__ = ["grace_from_params"]
