"""MHIM-MIL building blocks (Tang et al. 2023): instance masks, consistency loss, EMA, schedules.

Masks are computed per bag from the teacher's attention over its N real
(non-padded) instances; padding is never selected and never counted. Each
ratio is a fraction of N, rounded up as in the authors' code:
k = ceil(ratio * N) (with a 1e-9 guard so that 0.7 * 10 is 7, not 8), and a
ratio of 0 masks nothing.

- random masking (``ratio_r``): k_r instances drawn uniformly;
- low-attention masking (``ratio_l``): the k_l lowest-attention instances;
- high-attention masking (``ratio_h``, ``ratio_hr``): k_h = ceil(ratio_h N)
  instances drawn uniformly from the ceil(k_h / ratio_hr) highest-attention
  ones ("randomly HAM": ratio_hr 0.5 masks a random half of the top 2 k_h;
  ratio_hr 1 masks the top k_h).

The masked set is the union of the three. A bag is never emptied: if the union
covers all its instances, one of them, drawn at random, is kept.

Multi-head attention [B, H, N] (TransMIL's first layer) is reduced per bag by
``fusion``: ``vote`` (the paper's default): each head votes for its own top
(or bottom) k and the k instances with most votes are taken, ties broken by
the heads' mean attention; ``mean``: the heads' mean attention is ranked as one
head; ``split`` (the paper's "averaging", the authors' ``msa_fusion=mean``):
each head takes its own top ceil(k / H) and the union is taken (at most k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slidemil.names import MHIM_FUSIONS

FUSIONS = MHIM_FUSIONS
_EPS = 1e-9


def mask_count(ratio: float, n: torch.Tensor) -> torch.Tensor:
    """ceil(ratio * n) per bag (n: LongTensor of real lengths), 0 for ratio 0."""
    if ratio <= 0:
        return torch.zeros_like(n)
    return torch.ceil(n.double() * ratio - _EPS).clamp(min=0).long().minimum(n)


def _rank(scores: torch.Tensor, real: torch.Tensor, largest: bool) -> torch.Tensor:
    """Rank of each instance among its bag's real instances (0 = first); padding ranks last."""
    order = scores.float().argsort(dim=-1, descending=largest, stable=True)
    # Then move padding behind every real entry, keeping the score order among each.
    order = order.gather(-1, (~real.gather(-1, order)).to(torch.int8).argsort(dim=-1, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks.masked_fill(~real, order.shape[-1])


def top_k(scores: torch.Tensor, real: torch.Tensor, k: torch.Tensor, largest: bool = True,
          fusion: str = "vote") -> torch.Tensor:
    """Bool [B, N]: per bag the k[b] real instances with the highest (or lowest) scores.

    ``scores`` is [B, N] or per head [B, H, N] (reduced by ``fusion``).
    """
    k = k.view(-1, 1)
    if scores.dim() == 2:
        return (_rank(scores, real, largest) < k) & real
    if fusion not in FUSIONS:
        raise ValueError(f"unknown multi-head fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    heads = scores.shape[1]
    real_h = real.unsqueeze(1).expand_as(scores)
    mean = scores.float().mean(dim=1)
    if fusion == "mean":
        return top_k(mean, real, k.view(-1), largest)
    if fusion == "split":
        per_head = torch.ceil(k.double() / heads).long().unsqueeze(1)
        return ((_rank(scores, real_h, largest) < per_head) & real_h).any(dim=1)
    votes = ((_rank(scores, real_h, largest) < k.unsqueeze(1)) & real_h).sum(dim=1).float()
    # Within a vote count, prefer higher (lower) mean attention: a tie-break in [0, 0.5).
    lo = mean.masked_fill(~real, float("inf")).amin(dim=1, keepdim=True)
    hi = mean.masked_fill(~real, float("-inf")).amax(dim=1, keepdim=True)
    unit = ((mean - lo) / (hi - lo).clamp_min(1e-30)).clamp(0, 1)
    tie = 0.5 * (unit if largest else 1 - unit)
    return top_k(votes + tie, real, k.view(-1), largest=True)


def random_k(real: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B, N]: per bag k[b] instances drawn uniformly from ``candidates`` (default: all real)."""
    pool = real if candidates is None else candidates & real
    noise = torch.rand(real.shape, generator=generator, device="cpu").to(real.device)
    return top_k(noise, pool, k, largest=True)


def select_masked(
    attention: torch.Tensor,
    real: torch.Tensor,
    ratio_r: float = 0.0,
    ratio_l: float = 0.0,
    ratio_h: float = 0.0,
    ratio_hr: float = 1.0,
    fusion: str = "vote",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool [B, N]: the instances to remove from the student's bags (see the module docstring)."""
    if not 0 < ratio_hr <= 1:
        raise ValueError(f"mask_ratio_hr must be in (0, 1], got {ratio_hr}")
    n = real.sum(dim=1)
    masked = torch.zeros_like(real)
    if ratio_r > 0:
        masked |= random_k(real, mask_count(ratio_r, n), generator=generator)
    if ratio_l > 0:
        masked |= top_k(attention, real, mask_count(ratio_l, n), largest=False, fusion=fusion)
    if ratio_h > 0:
        k_h = mask_count(ratio_h, n)
        n_candidates = torch.ceil(k_h.double() / ratio_hr - _EPS).long().minimum(n)
        candidates = top_k(attention, real, n_candidates, largest=True, fusion=fusion)
        masked |= random_k(real, k_h, candidates, generator=generator)
    emptied = (real & ~masked).sum(dim=1) == 0
    if emptied.any():
        keep_one = random_k(real, emptied.long(), generator=generator)
        masked &= ~keep_one
    return masked & real


def compact(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the instances not kept: x [B, N, D] -> [B, max kept, D] and its padding mask.

    Kept instances stay in their original order (TransMIL's PPEG depends on it).
    """
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)
    n_keep = int(keep.sum(dim=1).max())
    order = order[:, :n_keep]
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x, keep.gather(1, order)


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor, temp_t: float = 0.1,
                     temp_s: float = 1.0) -> torch.Tensor:
    """Cross-entropy between softmax(teacher / temp_t) and log_softmax(student / temp_s), mean over bags."""
    target = F.softmax(teacher.detach().float() / temp_t, dim=-1)
    return -(target * F.log_softmax(student.float() / temp_s, dim=-1)).sum(dim=-1).mean()


def cosine(start: float, end: float, step: int, total_steps: int) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at step total_steps - 1 (and after)."""
    if total_steps <= 1:
        return float(end if step >= 1 else start)
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    return float(end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameters")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
