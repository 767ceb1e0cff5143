"""TransMIL (Shao et al. 2021) in the form MHIM-MIL uses as its baseline.

    h      = Dropout(ReLU(W_p x))                  projection to embed_dim
    t      = [cls; h]
    t      = t + MSA(LN(t))                        layer 1 (8 heads, pre-norm, residual)
    t[1:]  = PPEG(t[1:])                           positional encoding on the token grid
    t      = t + MSA(LN(t))                        layer 2
    logits = W_c LN(t)[0]                          class token

Exact multi-head attention (``F.scaled_dot_product_attention``) replaces the
paper's Nystrom approximation; padded instances are excluded as keys, so a
padded bag gives the output of the same bag alone.

PPEG (depthwise 7x7, 5x5 and 3x3 convolutions plus identity) lays each bag's
n real instance tokens row by row on a square grid of side ceil(sqrt(n)),
filling the remaining cells with copies of the first tokens as TransMIL does,
and grids smaller than 7 x 7 are zero-padded to 7 x 7 as in MHIM-MIL's code.
The grid is built per bag from its real length, never from the padded length.

Outputs beside the contract's: ``head_attention`` [B, H, N], the first
layer's attention of the class token to the instances per head, renormalised
over the real instances (exactly 0 at padding); ``attention`` is its mean over
heads. MHIM-MIL mines hard instances from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.mil.models import register_model
from slidemil.mil.models.abmil import _init_linear, masked_softmax

MIN_GRID = 7


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual connection."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, t: torch.Tensor, key_mask: torch.Tensor | None, cls_attention: bool = False):
        B, L, C = t.shape
        q, k, v = self.qkv(self.norm(t)).view(B, L, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        # [B, 1, 1, L] True = may attend; None lets PyTorch use its fused kernels.
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        t = t + self.out(z.transpose(1, 2).reshape(B, L, C))
        if not cls_attention:
            return t, None
        # Class-token query against the instance keys only: [B, H, N].
        scores = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)).squeeze(2) / math.sqrt(C // self.n_heads)
        inst_mask = None if key_mask is None else key_mask[:, None, 1:]
        return t, masked_softmax(scores.float(), inst_mask)


class PPEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """One bag's real tokens [n, C] -> the same tokens after the convolutions."""
        n, C = tokens.shape
        side = math.ceil(math.sqrt(n))
        fill = torch.arange(side * side - n, device=tokens.device) % n
        cells = torch.cat([tokens, tokens[fill]])
        if side < MIN_GRID:
            cells = torch.cat([cells, cells.new_zeros(MIN_GRID * MIN_GRID - side * side, C)])
            side = MIN_GRID
        g = cells.t().reshape(1, C, side, side)
        g = g + self.proj7(g) + self.proj5(g) + self.proj3(g)
        return g.reshape(C, side * side).t()[:n]

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.stack([self.grid(b) for b in h]).to(h.dtype)
        out = torch.zeros_like(h)
        for b in range(h.shape[0]):
            idx = mask[b].nonzero().squeeze(1)
            if len(idx):
                out[b, idx] = self.grid(h[b, idx]).to(out.dtype)  # autocast may return another dtype
        return out


@register_model("transmil")
class TransMIL(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        embed_dim: int = 512,
        n_heads: int = 8,
        dropout: float = 0.25,
        attn_dropout: float = 0.1,
    ):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.layer1 = SelfAttention(embed_dim, n_heads, attn_dropout)
        self.ppeg = PPEG(embed_dim)
        self.layer2 = SelfAttention(embed_dim, n_heads, attn_dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, n_classes)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        h = self.project(x)
        B = h.shape[0]
        if mask is not None and bool(mask.all()):
            mask = None
        key_mask = None if mask is None else torch.cat([mask.new_ones(B, 1), mask], dim=1)
        t = torch.cat([self.cls_token.expand(B, -1, -1).to(h.dtype), h], dim=1)
        t, head_attention = self.layer1(t, key_mask, cls_attention=True)
        t = torch.cat([t[:, :1], self.ppeg(t[:, 1:], mask)], dim=1)
        t, _ = self.layer2(t, key_mask)
        embedding = self.norm(t[:, 0])
        return {
            "logits": self.classifier(embedding),
            "attention": head_attention.mean(dim=1),
            "head_attention": head_attention,
            "embedding": embedding,
        }
