"""Helpers for the nn-module tests."""
import io

import torch
from torch import nn


def load_saved(model: nn.Module, other: nn.Module) -> nn.Module:
    """``other`` after loading ``model``'s state_dict through torch.save and
    torch.load(weights_only=True), as a user ships a converted model."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    return other
