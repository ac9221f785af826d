"""An exponential moving average of a model's weights (``train.ema_decay``), as ActionFormer and
AdaTAD validate with: smoother than the raw weights late in training, at no training cost."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class WeightEma:
    """EMA of every floating tensor of ``model.state_dict()`` (buffers included, like
    ActionFormer's ``ModelEma``); integer buffers are copied.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: without it a
    short run (a few hundred steps at decay 0.999) would validate weights still mostly at their
    random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in (0, 1) to use an EMA (got {decay})")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Inside the block ``model`` holds the averaged weights; its own come back afterwards."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(backup)
