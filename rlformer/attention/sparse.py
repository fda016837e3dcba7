"""Sparse Transformer factorized attention (Child et al. 2019) and blockwise attention (Qiu et al. 2020)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlformer.attention.masks import Pattern, PatternAttention, block_of
from rlformer.config import EncoderConfig
from rlformer.registry import register


class FactorizedAttention(PatternAttention):
    """Two factorized patterns A^(1), A^(2) used as in Child et al. 2019, sec. 4.3 (``sparse.mode``):

    - ``interleaved``: attention(X) = W_p attend(X, A^(r mod 2)), r the layer index (one pattern per
      residual block, alternating);
    - ``merged``: attend(X, A^(1) U A^(2)) in every head;
    - ``split``: multi-head, head h attends with A^(h mod 2 + 1).

    Fast paths (both equal to the dense pattern): strided runs A^(2) as attention inside the stride
    columns (``column_attention``); fixed orders the keys summary-first for FlexAttention
    (``FixedAttention.summary_first``). See the two classes.
    """

    name = ""

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        sp = cfg.sparse
        if sp.stride < 1:
            raise ValueError(f"attention={cls.name!r} needs sparse.stride >= 1, got {sp.stride}")
        if sp.mode not in ("interleaved", "merged", "split"):
            raise ValueError(f"sparse.mode must be 'interleaved', 'merged' or 'split', got {sp.mode!r}")
        if sp.mode == "split" and cfg.n_heads < 2:
            raise ValueError(f"attention={cls.name!r} with sparse.mode='split' gives the two patterns to different "
                             f"heads, so it needs n_heads >= 2 (got {cfg.n_heads}); use mode='merged' or "
                             f"'interleaved' with one head")
        if sp.mode == "interleaved" and cfg.n_layers < 2:
            raise ValueError(f"attention={cls.name!r} with sparse.mode='interleaved' alternates the two patterns "
                             f"across layers, so it needs n_layers >= 2 (got {cfg.n_layers}); use mode='merged'")

    def parts(self, tk: int):
        """(A1, A2) as tensor rules and (A1, A2) as plain-Python rules."""
        raise NotImplementedError

    def _select(self, a1, a2):
        mode = self.cfg.sparse.mode
        if mode == "merged":
            return lambda h, i, j: a1(h, i, j) | a2(h, i, j)
        if mode == "interleaved":
            return a1 if self.layer % 2 == 0 else a2
        return lambda h, i, j: torch.where(h % 2 == 0, a1(h, i, j), a2(h, i, j))

    def pattern(self, ctx, tk):
        (a1, a2), _ = self.parts(tk)
        sp = self.cfg.sparse
        key = (self.name, sp.stride, sp.summary, sp.mode, self.layer % 2 if sp.mode == "interleaved" else 0)
        return Pattern(self._select(a1, a2), key, per_head=sp.mode == "split")

    def reference_rule(self, ctx, tk):
        _, (a1, a2) = self.parts(tk)
        mode = self.cfg.sparse.mode
        if mode == "merged":
            return lambda h, i, j: a1(i, j) or a2(i, j)
        if mode == "interleaved":
            return (lambda h, i, j: a1(i, j)) if self.layer % 2 == 0 else (lambda h, i, j: a2(i, j))
        return lambda h, i, j: a1(i, j) if h % 2 == 0 else a2(i, j)


def column_attention(q: Tensor, k: Tensor, v: Tensor, stride: int, causal: bool, key_valid: Optional[Tensor],
                     scale: float, dropout: float = 0.0) -> Tensor:
    """Attention restricted to (i - j) mod l = 0 (Sparse Transformer A^(2)), as dense attention per column.

    Key index x = a*l + b sits in column b, row a; i and j share a column iff (i - j) mod l = 0, and
    there j <= i iff row(j) <= row(i). So q, k, v (B, H, N, dh) are padded to N' = R*l (R = ceil(N / l)),
    reshaped (B, H, R, l, dh) -> (B*l, H, R, dh), and each column is one short sequence: a single
    ``scaled_dot_product_attention`` call, causal without any mask (flash on CUDA), O(N^2 / l) work.
    Queries are the last Tq of the N key positions (an XL memory prefix of M = N - Tq slots gets zero
    dummy queries, whose outputs are dropped). A boolean mask, at most (B*l, 1, R, R), is built only
    with ``key_valid`` (padding, empty memory; a query always keeps its own key, as in
    ``AttentionContext.allowed``) or for the padded tail of a bidirectional call.
    """
    b, h, tq, d = q.shape
    n, l = k.shape[2], stride
    m, r = n - tq, -(-n // stride)
    pad = r * l - n
    if m:
        q = torch.cat([q.new_zeros(b, h, m, d), q], 2)

    def columns(x):                                      # one copy: (B, H, R*l, dh) -> (B*l, H, R, dh)
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.unflatten(2, (r, l)).permute(0, 3, 1, 2, 4).reshape(b * l, h, r, d)

    mask = None
    if key_valid is not None or (pad and not causal):
        valid = key_valid if key_valid is not None else torch.ones(1, n, dtype=torch.bool, device=q.device)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], 1)
        valid = valid.view(-1, r, l).transpose(1, 2)                        # (B|1, l, R): column, row
        mask = valid[:, :, None, :] | torch.eye(r, dtype=torch.bool, device=q.device)
        if causal:
            mask = mask & torch.ones(r, r, dtype=torch.bool, device=q.device).tril()
        mask = mask.expand(b, l, r, r).reshape(b * l, 1, r, r)
    out = F.scaled_dot_product_attention(columns(q), columns(k), columns(v), attn_mask=mask, dropout_p=dropout,
                                         is_causal=causal and mask is None, scale=scale)
    return out.view(b, l, h, r, d).permute(0, 2, 3, 1, 4).reshape(b, h, r * l, d)[:, :, m:n]


@register("attention", "strided")
class StridedAttention(FactorizedAttention):
    """Sparse Transformer strided attention (Child et al. 2019, sec. 4.2, Fig. 3b).

    With stride l = ``sparse.stride``, for query i (key-sequence index) and key j:
        A^(1)_i = { j : |i - j| <= l }                      (the previous l positions when causal)
        A^(2)_i = { j : (i - j) mod l = 0 }                  (every l-th position)
    causal adds j <= i, which gives the paper's A^(1)_i = {t, ..., i}, t = max(0, i - l), and
    A^(2)_i = {j <= i : (i - j) mod l = 0}; bidirectional uses both sides. Combined per
    ``sparse.mode`` (see FactorizedAttention). ``merged`` with l >= T is full attention.

    Fast path (``split`` and ``interleaved``, no score/value position): the A^(2) heads (odd heads;
    odd layers when interleaved) run ``column_attention``, the sequence reshaped so that every stride
    class is one contiguous column and A^(2) is plain (causal) attention inside each column: one SDPA
    call, O(T^2 / l), honouring XL memory and ``key_valid``. The A^(1) heads (a band of width l) go
    through the pattern path (block-sparse FlexAttention on CUDA, the dense mask on CPU). ``merged``
    (A^(1) U A^(2) in one head) and score/value positions (ALiBi, XL, Shaw) use the pattern path for
    every head: no ordering of the keys makes the union of a band and the columns block-sparse, so
    merged is not faster than full attention.
    """

    name = "strided"

    def parts(self, tk):
        stride = self.cfg.sparse.stride

        def a1(h, i, j):
            return (i - j).abs() <= stride

        def a2(h, i, j):
            return (i - j) % stride == 0

        def a1_ref(i, j):
            return j in range(i - stride, i + stride + 1)

        def a2_ref(i, j):
            return j in range(i % stride, tk, stride)

        return (a1, a2), (a1_ref, a2_ref)

    def columns(self, q, k, v, ctx):
        return column_attention(q, k, v, self.cfg.sparse.stride, ctx.causal, ctx.key_valid, self.scale,
                                self.dropout if self.training else 0.0)

    def attend(self, q, k, v, ctx):
        mode = self.cfg.sparse.mode
        if mode == "merged" or self.score_position is not None:
            return super().attend(q, k, v, ctx)
        (a1, _), _ = self.parts(k.shape[2])
        band = Pattern(a1, (self.name, self.cfg.sparse.stride, "A1"))
        if mode == "interleaved":
            out = self.columns(q, k, v, ctx) if self.layer % 2 else self.attend_pattern(q, k, v, ctx, band)
            return out, {}
        even, odd = slice(0, None, 2), slice(1, None, 2)           # split: head h uses A^(h mod 2 + 1)
        out1 = self.attend_pattern(q[:, even], k[:, even], v[:, even], ctx, band)
        out2 = self.columns(q[:, odd], k[:, odd], v[:, odd], ctx)
        if out1.shape[1] == out2.shape[1]:                          # interleave the heads back: one copy
            return torch.stack([out1, out2], 2).flatten(1, 2), {}
        heads = torch.arange(q.shape[1], device=q.device)
        back = torch.argsort(torch.cat([heads[even], heads[odd]]))
        return torch.cat([out1, out2], 1)[:, back], {}


@register("attention", "fixed")
class FixedAttention(FactorizedAttention):
    """Sparse Transformer fixed attention (Child et al. 2019, sec. 4.2, Fig. 3c).

    With block length l = ``sparse.stride`` and c = ``sparse.summary`` summary positions per block:
        A^(1)_i = { j : floor(j / l) = floor(i / l) }        (own block)
        A^(2)_i = { j : j mod l in {l - c, ..., l - 1} } U {i}   (the last c cells of every block)
    causal adds j <= i. A query always sees itself in A^(2) too: without it the causal rows before the
    first summary cell (i < l - c) would be empty when A^(2) is used alone (split / interleaved).
    ``merged`` with l >= T is full attention.

    Fast path (CUDA, FlexAttention): whenever A^(2) is used, the pattern carries a key order with the
    T c / l summary keys first and the rest after (``summary_first``). The Flex path gathers k, v in that
    order and maps keys back through it inside the mask_mod, so the softmax is exactly the one over
    A^(1) U A^(2) (each key once, no merge of partial softmaxes), while the summary columns, spread over
    every key block in sequence order, become one contiguous run: the BlockMask holds a causal staircase
    over T c / l keys plus O(1) blocks per query block (own block, or the query itself), instead of every
    block. All modes, XL memory, padding and ALiBi go through it. The CPU path is the dense mask
    (FlexAttention has no CPU backward), so the Flex gradients are checked on CUDA only.
    """

    name = "fixed"

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        super().validate(cfg)
        if not 1 <= cfg.sparse.summary <= cfg.sparse.stride:
            raise ValueError(f"attention='fixed' needs 1 <= sparse.summary (c) <= sparse.stride (l); got "
                             f"c={cfg.sparse.summary}, l={cfg.sparse.stride}")

    def parts(self, tk):
        block, c = self.cfg.sparse.stride, self.cfg.sparse.summary

        def a1(h, i, j):
            return block_of(i, block) == block_of(j, block)

        def a2(h, i, j):
            return (j % block >= block - c) | (i == j)

        def a1_ref(i, j):
            start = (i // block) * block
            return j in range(start, start + block)

        def a2_ref(i, j):
            summaries = {s + t for s in range(0, tk, block) for t in range(block - c, block)}
            return j in summaries or j == i

        return (a1, a2), (a1_ref, a2_ref)

    def summary_first(self, tk: int) -> Tensor:
        """(tk,) long: the key positions with the summary cells (x mod l >= l - c) first, both in order."""
        x = torch.arange(tk)
        summary = x % self.cfg.sparse.stride >= self.cfg.sparse.stride - self.cfg.sparse.summary
        return torch.cat([x[summary], x[~summary]])

    def pattern(self, ctx, tk):
        pattern = super().pattern(ctx, tk)
        if self.cfg.sparse.mode == "interleaved" and self.layer % 2 == 0:
            return pattern                                          # A^(1) alone: block-diagonal in order
        return replace(pattern, key=pattern.key + ("summary-first", tk), key_order=self.summary_first(tk))


@register("attention", "blockwise")
class BlockwiseAttention(PatternAttention):
    """BlockBERT blockwise self-attention (Qiu et al. 2020, sec. 3, eq. 3-4).

    The key sequence of length N is split into n = ``sparse.n_blocks`` blocks, block(x) = floor(x n / N)
    (lengths not divisible by n give blocks differing by one). Head h has a permutation pi_h of the
    blocks and a query in block a attends only to the keys of block pi_h(a):

        M^h_ij = 1  iff  pi_h(block(i)) = block(j),   Attention(Q, K, V, M) = softmax(QK^T/sqrt(d) masked by M) V.

    The paper's permutations are the cyclic shifts (1 2 .. n), (2 3 .. n 1), ...: with ``sparse.seed``
    = 0 head h uses the shift pi_h(a) = (a + h) mod n; with seed > 0 each head (and layer) draws a random
    permutation from that seed. n = 1 is full attention. With a validity mask (padding or memory) a
    query also sees itself, so a query whose partner block is all padding still has a key.
    """

    supports_causal = False
    causal_note = ("Its heads attend to permuted blocks, e.g. block 1 -> block 2, so restricting to "
                   "j <= i would leave those queries with no keys at all.")

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.sparse.n_blocks < 1:
            raise ValueError(f"attention='blockwise' needs sparse.n_blocks >= 1, got {cfg.sparse.n_blocks}")

    def permutations(self) -> torch.Tensor:
        """(H, n) long: pi_h(a) for every head h and block a."""
        n, seed = self.cfg.sparse.n_blocks, self.cfg.sparse.seed
        if seed == 0:
            return (torch.arange(n)[None, :] + torch.arange(self.n_heads)[:, None]) % n
        gen = torch.Generator().manual_seed(seed * 100_003 + self.layer)
        return torch.stack([torch.randperm(n, generator=gen) for _ in range(self.n_heads)])

    def _check(self, tk):
        if tk < self.cfg.sparse.n_blocks:
            raise ValueError(f"attention='blockwise' splits the keys into sparse.n_blocks={self.cfg.sparse.n_blocks} "
                             f"blocks but got only {tk} keys; use sequences of at least n_blocks tokens")

    def pattern(self, ctx, tk):
        self._check(tk)
        n = self.cfg.sparse.n_blocks

        def rule(h, i, j, perm):
            a, b = block_of(i * n, tk), block_of(j * n, tk)
            return perm[h, a] == b

        perm = self.permutations()
        return Pattern(rule, ("blockwise", n, tk, tuple(perm.flatten().tolist())), per_head=True,
                       tables={"perm": perm})

    def reference_rule(self, ctx, tk):
        self._check(tk)
        n = self.cfg.sparse.n_blocks
        perm = self.permutations().tolist()
        blocks = [[x for x in range(tk) if x * n // tk == a] for a in range(n)]

        def rule(h, i, j):
            own = next(a for a in range(n) if i in blocks[a])
            return j in blocks[perm[h][own]]

        return rule
