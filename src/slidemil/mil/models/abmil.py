"""Attention-based MIL (Ilse et al. 2018): their attention, with MHIM-MIL's AB-MIL projection by default.

    h_i = Dropout(ReLU(W_p x_i))                        projection to embed_dim (n_layers such layers)
    a   = softmax_i(w^T tanh(V h_i))                    (abmil)
    a   = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))) (abmil_gated)
    z   = sum_i a_i h_i                                 bag embedding
    logits = W_c z

This is exactly Ilse et al.'s attention: tanh (and, gated, sigmoid) of linear layers
with biases. The official MHIM-MIL code's AB-MIL baseline (``DAttention`` in modules/abmil.py, commit fba0f1c)
is the same: Linear(512, 128) + tanh + Linear(128, 1), biases on (its ``mil_bias`` flag, default true), after
one projection Linear(1024, 512) + ReLU (``act``; its config/feat_cls.yaml picks GELU) + dropout 0.25, so no
other attention variant is offered here. Our default projection is that one layer. ``n_layers``
> 1 stacks projection layers of halving width (embed_dim, embed_dim/2, ...): ``embed_dim: 256, n_layers: 3``
is Ilse et al.'s MIL-benchmark network (fc-256, fc-128, fc-64 with ReLU; attention hidden 64), with our dropout.

``masked_softmax`` and ``AttentionPool`` are shared with the models built on
this attention (VarMIL).
"""

from __future__ import annotations

import torch
from torch import nn

from slidemil.mil.models import register_model


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim that gives exactly 0 weight to masked-out entries.

    A row with no real entry gets all-zero weights. Softmax of an all -inf row
    would be NaN, and masking the NaN afterwards is not enough: its gradient
    would still poison the parameters, so such rows are made finite first.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)


class AttentionPool(nn.Module):
    """Attention weights over the instances of a bag, plain (tanh) or gated."""

    def __init__(self, embed_dim: int, attn_dim: int, gated: bool):
        super().__init__()
        self.V = nn.Linear(embed_dim, attn_dim)
        self.U = nn.Linear(embed_dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h [B, N, E] -> normalised weights [B, N]."""
        hidden = torch.tanh(self.V(h))
        if self.U is not None:
            hidden = hidden * torch.sigmoid(self.U(h))
        return masked_softmax(self.w(hidden).squeeze(-1), mask)


class ABMIL(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        embed_dim: int = 512,
        attn_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = False,
        n_layers: int = 1,
    ):
        super().__init__()
        self.project, embed_dim = projection(in_dim, embed_dim, dropout, n_layers)
        self.pool = AttentionPool(embed_dim, attn_dim, gated)
        self.classifier = nn.Linear(embed_dim, n_classes)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        h = self.project(x)
        attention = self.pool(h, mask)
        # Padding rows contribute 0 * h_i: their weight is exactly 0.
        embedding = torch.bmm(attention.unsqueeze(1).to(h.dtype), h).squeeze(1)
        return {"logits": self.classifier(embedding), "attention": attention, "embedding": embedding}


def projection(in_dim: int, embed_dim: int, dropout: float, n_layers: int = 1) -> tuple[nn.Sequential, int]:
    """``n_layers`` x (Linear, ReLU, Dropout) of widths embed_dim, embed_dim/2, ...; returns it and its output width.
    (create_model checks that the widths stay >= 1: slidemil.config.check_model_settings.)"""
    layers, width = [], in_dim
    for i in range(n_layers):
        layers += [nn.Linear(width, embed_dim >> i), nn.ReLU(), nn.Dropout(dropout)]
        width = embed_dim >> i
    return nn.Sequential(*layers), width


def _init_linear(module: nn.Module) -> None:
    # Xavier-normal weights and zero biases, as in MHIM-MIL's (and CLAM's) baselines.
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model("abmil")
def abmil(
    in_dim: int, n_classes: int = 2, embed_dim: int = 512, attn_dim: int = 128, dropout: float = 0.25, n_layers: int = 1
) -> ABMIL:
    return ABMIL(in_dim, n_classes, embed_dim=embed_dim, attn_dim=attn_dim, dropout=dropout, gated=False,
                 n_layers=n_layers)


@register_model("abmil_gated")
def abmil_gated(
    in_dim: int, n_classes: int = 2, embed_dim: int = 512, attn_dim: int = 128, dropout: float = 0.25, n_layers: int = 1
) -> ABMIL:
    return ABMIL(in_dim, n_classes, embed_dim=embed_dim, attn_dim=attn_dim, dropout=dropout, gated=True,
                 n_layers=n_layers)
