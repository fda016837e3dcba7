"""A differentiable dense stand-in for ``flex_attention``, for CPU tests of the flex paths' autograd plumbing.

FlexAttention has no backward on CPU; this evaluates the score_mod and the BlockMask's mask_mod on the whole
(Tq, Tk) grid with broadcast index tensors, so autograd reaches the tensors they capture and the pieces around
the kernel (gathers, unit keys, round combination, span gradients) can be differentiated on CPU. Empty rows give
out = 0 and lse = -inf, as FlexAttention does.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


def dense_flex(q, k, v, score_mod=None, block_mask=None, scale=None, return_lse=False, return_aux=None):
    b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bi, hi = torch.arange(b)[:, None, None, None], torch.arange(h)[None, :, None, None]
    qi, ki = torch.arange(tq)[None, None, :, None], torch.arange(tk)[None, None, None, :]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if score_mod is not None:
        scores = score_mod(scores, bi, hi, qi, ki)
    if block_mask is not None:
        scores = scores.masked_fill(~block_mask.mask_mod(bi, hi, qi, ki).expand_as(scores), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(torch.isfinite(lse)[..., None], torch.exp(scores - lse[..., None]), 0.0)
    out = probs @ v
    if return_aux is not None:
        return out, SimpleNamespace(lse=lse)
    return (out, lse) if return_lse else out
