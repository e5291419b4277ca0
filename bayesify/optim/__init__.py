"""Optimizers usable on their own: :class:`IVON`, a drop-in for Adam whose state is a
Gaussian posterior over the weights."""

from bayesify.optim.ivon import IVON

__all__ = ["IVON"]
