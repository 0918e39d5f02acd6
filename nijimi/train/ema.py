"""Exponential moving average of model weights (the "EMA weights" SD checkpoints ship)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy ``θ̄ ← d·θ̄ + (1−d)·θ`` of a module's float parameters and buffers.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, as the LDM code does, so early
    weights are not frozen into the average.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into ``module`` (parameters not averaged are left as they are)."""
        module.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
