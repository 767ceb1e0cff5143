"""VarMIL (DeepSMILE, Schirris et al. 2022, eq. 5-10): attention-weighted mean and variance.

    a   = softmax_i(w^T tanh(V h_i))                       DeepMIL attention (eq. 5)
    M   = sum_i a_i h_i                                    (eq. 6)
    S   = N / (N - 1) * sum_i a_i (h_i - M)^2              per dimension, no square root (eq. 8)
    logits = W [M; S] + b                                  (eq. 9-10)

DeepSMILE applies the attention to the extractor's features directly
(``embed_dim: null``); an integer ``embed_dim`` adds AB-MIL's projection
(Linear + ReLU + dropout) first, ``n_layers`` such layers of halving width as in
``slidemil.mil.models.abmil.projection`` (``embed_dim: 256, n_layers: 3`` is Ilse
et al.'s fc-256, fc-128, fc-64). N is the number of real (non-padded)
instances (``variance_n: real``, the paper) or, as in the reference code, the
number of non-zero attention weights (``variance_n: nonzero``; they differ
only where a softmax weight underflows to 0). A bag with N = 1 has S = 0.
Weights use He initialisation, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from slidemil.mil.models import register_model
from slidemil.mil.models.abmil import AttentionPool, projection


@register_model("varmil")
class VarMIL(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        embed_dim: int | None = None,
        attn_dim: int = 128,
        dropout: float = 0.0,
        gated: bool = False,
        variance_n: str = "real",
        n_layers: int = 1,
    ):
        super().__init__()
        self.variance_n = variance_n
        if embed_dim is None:
            self.project = nn.Dropout(dropout)
            embed_dim = in_dim
        else:
            self.project, embed_dim = projection(in_dim, embed_dim, dropout, n_layers)
        self.pool = AttentionPool(embed_dim, attn_dim, gated)
        self.classifier = nn.Linear(2 * embed_dim, n_classes)
        self.apply(_init_he)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        h = self.project(x)
        attention = self.pool(h, mask)
        a = attention.unsqueeze(1).to(h.dtype)
        mean = torch.bmm(a, h)  # [B, 1, E]
        # Padding rows have weight 0, so their (h_i - M)^2 never counts.
        weighted_sq = torch.bmm(a, (h - mean).pow(2)).squeeze(1)
        if self.variance_n == "real":
            n = mask.sum(dim=1) if mask is not None else torch.full(h.shape[:1], h.shape[1], device=h.device)
        else:
            n = (attention > 0).sum(dim=1)
        n = n.to(h.dtype).unsqueeze(1)
        # N / (N - 1) is undefined for a single instance, whose variance is 0.
        factor = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.zeros_like(n))
        variance = factor * weighted_sq
        embedding = torch.cat([mean.squeeze(1), variance], dim=1)
        return {"logits": self.classifier(embedding), "attention": attention, "embedding": embedding}


def _init_he(module: nn.Module) -> None:
    # DeepSMILE section 4.2.2: He initialisation.
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
