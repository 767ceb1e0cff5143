"""Mean- and max-pooling baselines: the same projection as AB-MIL, no attention.

    h_i = Dropout(ReLU(W_p x_i))      (n_layers such layers, as AB-MIL's projection)
    z   = mean_i h_i   (meanpool)   or   max_i h_i per dimension (maxpool)
    logits = W_c z

Only real instances are pooled: padding never enters the mean (nor its
denominator) or the max.
"""

from __future__ import annotations

import torch
from torch import nn

from slidemil.mil.models import register_model
from slidemil.mil.models.abmil import _init_linear, projection


class PoolMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, embed_dim: int, dropout: float, mode: str, n_layers: int = 1):
        super().__init__()
        self.mode = mode
        self.project, embed_dim = projection(in_dim, embed_dim, dropout, n_layers)
        self.classifier = nn.Linear(embed_dim, n_classes)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        h = self.project(x)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        n = mask.sum(dim=1, keepdim=True)
        if self.mode == "mean":
            # Uniform weights over the real instances: the mean is their weighted sum.
            attention = mask.to(h.dtype) / n.clamp_min(1).to(h.dtype)
            embedding = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
        else:
            attention = None
            embedding = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
            # A bag without real instances would give -inf: pool it to zeros instead.
            embedding = embedding.masked_fill((n == 0).expand_as(embedding), 0.0)
        return {"logits": self.classifier(embedding), "attention": attention, "embedding": embedding}


@register_model("meanpool")
def meanpool(in_dim: int, n_classes: int = 2, embed_dim: int = 512, dropout: float = 0.25, n_layers: int = 1) -> PoolMIL:
    return PoolMIL(in_dim, n_classes, embed_dim, dropout, mode="mean", n_layers=n_layers)


@register_model("maxpool")
def maxpool(in_dim: int, n_classes: int = 2, embed_dim: int = 512, dropout: float = 0.25, n_layers: int = 1) -> PoolMIL:
    return PoolMIL(in_dim, n_classes, embed_dim, dropout, mode="max", n_layers=n_layers)
