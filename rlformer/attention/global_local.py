"""Sliding windows plus global attention: Longformer, BigBird, ETC."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from rlformer.attention.base import merge_heads, split_heads
from rlformer.attention.masks import Pattern, PatternAttention, block_of, is_global, loop_mask, mix_hash, runs
from rlformer.attention.reference import dense_attention
from rlformer.config import EncoderConfig
from rlformer.registry import register


class _RowsReplacedLinear(torch.autograd.Function):
    """y = W merge_heads(out with the rows ``rows`` replaced by ``rows_out``) + b, without forming that merged copy.

    y = W merge_heads(out) + b, then y[rows] += W (rows_out - out[rows]); merge_heads of FlexAttention's output is a
    view (its layout is (B, T, H, dh)), so only ``out`` (which the attention keeps for its own backward anyway) and
    the |G| rows are kept for backward, not one more (B, T, D) tensor. Backward: dL/d merged = dy W (zero on the
    replaced rows for ``out``, those rows for ``rows_out``), dL/dW = dy^T merge_heads(out) + dy[rows]^T (rows_out -
    out[rows]), dL/db = sum dy."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, out, rows, rows_out, weight, bias):
        merged = merge_heads(out)
        delta = merge_heads(rows_out) - merged[:, rows]
        y = F.linear(merged, weight, bias)
        y.index_add_(1, rows, F.linear(delta, weight))
        ctx.save_for_backward(out, rows, rows_out, weight)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        out, rows, rows_out, weight = ctx.saved_tensors
        grad_out = grad_rows = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            grad_merged = grad_y @ weight.to(grad_y.dtype)
            grad_rows = split_heads(grad_merged[:, rows], out.shape[1])
            grad_merged.index_fill_(1, rows, 0)       # (no host scalar: the step can be captured in a CUDA graph)
            grad_out = split_heads(grad_merged, out.shape[1])
        if ctx.needs_input_grad[3]:
            merged = merge_heads(out)
            delta = merge_heads(rows_out) - merged[:, rows]
            grad_w = (grad_y.flatten(0, 1).T @ merged.flatten(0, 1)
                      + grad_y[:, rows].flatten(0, 1).T @ delta.flatten(0, 1)).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = grad_y.sum((0, 1))
        return grad_out, None, grad_rows, grad_w, grad_b


def rows_replaced_linear(out, rows, rows_out, linear: nn.Linear):
    """``linear(merge_heads(out'))`` with out' = ``out`` whose rows ``rows`` (T positions) are ``rows_out``
    (B, H, G, dh): Longformer's global rows written into the output projection (``_RowsReplacedLinear``)."""
    return _RowsReplacedLinear.apply(out, rows, rows_out, linear.weight, linear.bias)


def _check_globals(name: str, cfg: EncoderConfig) -> None:
    bad = [p for p in cfg.global_local.global_positions if p < 0]
    if bad:
        raise ValueError(f"attention={name!r}: global_local.global_positions are positions in the segment "
                         f"(0 = first token) and must be >= 0; got {bad}")


@register("attention", "longformer")
class LongformerAttention(PatternAttention):
    """Longformer attention (Beltagy et al. 2020, sec. 3.1): sliding window + dilated window + global.

    With w = this layer's window (``global_local.layer_windows[layer]``, else ``window``; the paper
    grows it from low to high layers), dilation d and G the global positions, for query i and key j
    (key-sequence indices; global positions count from the segment start, i - M with M memory slots):

        normal heads:   |i - j| <= w                                   (w keys on each side)
        dilated heads:  |i - j| <= w*d  and  (i - j) mod d = 0         (the first ``dilated_heads`` heads)
        global:         i - M in G  (attends everywhere)  or  j - M in G  (seen by everyone)

    causal adds j <= i (the paper's autoregressive setting: w preceding keys). As in the paper, the rows
    of the global queries use their own projections Q_g, K_g, V_g (``global_local.global_projections``;
    False = reuse the layer's Q_s, K_s, V_s): y_i = softmax(Q_g(x_i) K_g(X)^T / sqrt(d)) V_g(X) over every
    allowed key, computed densely for the |G| global rows only, K_g and V_g folded into the queries and into
    the probability-weighted sum of X (O(|G| N) memory per head, never the (N, d) K_g, V_g; they are formed only
    when rotary or score positions act on the keys); all other rows use Q_s, K_s, V_s with the pattern above.
    A window covering the sequence and no globals gives full attention.
    """

    def __init__(self, cfg, layer, position):
        super().__init__(cfg, layer, position)
        if cfg.global_local.global_projections:
            self.q_global = nn.Linear(cfg.d_model, cfg.d_model)
            self.kv_global = nn.Linear(cfg.d_model, 2 * cfg.d_model)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        gl = cfg.global_local
        if gl.window < 0 or gl.dilation < 1:
            raise ValueError(f"attention='longformer' needs global_local.window >= 0 and dilation >= 1; got "
                             f"window={gl.window}, dilation={gl.dilation}")
        if not 0 <= gl.dilated_heads <= cfg.n_heads:
            raise ValueError(f"attention='longformer' needs 0 <= global_local.dilated_heads <= n_heads="
                             f"{cfg.n_heads}; got {gl.dilated_heads}")
        if gl.layer_windows and (len(gl.layer_windows) != cfg.n_layers or min(gl.layer_windows) < 0):
            raise ValueError(f"global_local.layer_windows gives one window >= 0 per layer: expected {cfg.n_layers} "
                             f"values (n_layers), got {tuple(gl.layer_windows)}; leave it empty to use "
                             f"window={gl.window} everywhere")
        _check_globals("longformer", cfg)

    @property
    def window(self) -> int:
        gl = self.cfg.global_local
        return gl.layer_windows[self.layer] if gl.layer_windows else gl.window

    def pattern(self, ctx, tk):
        gl, w = self.cfg.global_local, self.window
        d, n_dil, glob, m = gl.dilation, gl.dilated_heads, tuple(gl.global_positions), ctx.n_mem

        def rule(h, i, j):
            dist = i - j
            normal = dist.abs() <= w
            dilated = (dist.abs() <= w * d) & (dist % d == 0)
            window = torch.where(h < n_dil, dilated, normal)
            return window | is_global(i - m, glob) | is_global(j - m, glob)

        return Pattern(rule, ("longformer", w, d, n_dil, glob, m), per_head=n_dil > 0)

    def _global_queries(self, x, ctx):
        """(rows, Q_g(x) at the rows (B, H, G, dh), the context of those rows), or None when there are no
        global rows in the segment (or global projections are off)."""
        rows = [g for g in sorted(set(self.cfg.global_local.global_positions)) if g < x.shape[1]]
        if not rows or not self.cfg.global_local.global_projections:
            return None
        # built on the device from runs (no host-to-device copy: the step can be captured in a CUDA graph)
        rows_t = torch.cat([torch.arange(lo, hi + 1, device=x.device) for lo, hi in runs(tuple(rows))])
        q = split_heads(self.q_global(x[:, rows_t]), self.n_heads)
        return rows_t, q, replace(ctx, q_index=ctx.q_index[rows_t], q_pos=ctx.q_pos[:, rows_t])

    def _global_rows_dense(self, found, kv, mask_fn):
        """Outputs (B, H, G, dh) of the global rows ``found`` (``_global_queries``) with K_g, V_g formed:
        softmax(Q_g K_g^T) V_g over the allowed keys, position hooks applied (the reference, and the fast path
        under rotary or score positions)."""
        _, q, sub = found
        k, v = (split_heads(t, self.n_heads) for t in self.kv_global(kv).chunk(2, dim=-1))
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, sub.q_index, sub.k_index)
        dropout = self.dropout if self.training else 0.0
        return dense_attention(q, k, v, mask_fn(sub), self.scale, self.score_position, sub.q_index, sub.k_index,
                               dropout, self.training)

    def _global_rows_absorbed(self, found, kv):
        """Outputs of the global rows ``found`` without forming K_g, V_g = kv W^T + b ((B, Tk, D) each, kept for
        backward): per head h, q . (W_k^h x_j + b_k^h) = (q W_k^h) . x_j + q . b_k^h and
        sum_j p_j (W_v^h x_j + b_v^h) = W_v^h (sum_j p_j x_j) + b_v^h sum_j p_j, so only the (B, H, G, Tk) scores
        and probabilities exist: O(G Tk) per head instead of O(Tk D). Exact; no position hooks on the keys."""
        _, q, sub = found
        h, dh = self.n_heads, self.d_head
        d = h * dh
        w, bias = self.kv_global.weight.to(q.dtype), self.kv_global.bias.to(q.dtype)
        wk, wv, bk, bv = w[:d].view(h, dh, -1), w[d:].view(h, dh, -1), bias[:d].view(h, dh), bias[d:].view(h, dh)
        b, g = q.shape[0], q.shape[2]
        u = torch.einsum("bhgd,hdc->bhgc", q, wk).reshape(b, h * g, -1)
        scores = (u @ kv.transpose(1, 2)).view(b, h, g, -1)         # bmm on kv's transpose: no copy of kv kept
        scores = (scores + torch.einsum("bhgd,hd->bhg", q, bk)[..., None]) * self.scale
        allowed = sub.allowed()
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
        if self.dropout > 0 and self.training:
            probs = F.dropout(probs, self.dropout)
        summed = (probs.reshape(b, h * g, -1) @ kv).view(b, h, g, -1)  # sum_j p_j x_j
        out = torch.einsum("bhgc,hdc->bhgd", summed, wv)
        return out + probs.sum(-1, keepdim=True) * bv[None, :, None, :]

    def forward(self, x, kv, ctx):
        # the global rows first, before the projections: autograd runs the backward of later-made nodes first, so
        # the rows' (B, N, D) gradients of x / kv come last instead of waiting, summed, through the windowed
        # attention's and the projections' backward (16 MiB at 16k, 64 MiB at 64k on the benchmark's peak)
        found = self._global_queries(x, ctx)
        rows_out = None
        if found is not None and self.position is not None and self.position.hooks & {"rotary", "score", "value"}:
            rows_out = self._global_rows_dense(found, kv, lambda sub: sub.allowed())
        elif found is not None:
            rows_out = self._global_rows_absorbed(found, kv)
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, ctx.q_index, ctx.k_index)
        out = self.attend_pattern(q, k, v, ctx, self.pattern(ctx, k.shape[2]))
        if found is None:
            return self.out_proj(merge_heads(out)), {}
        return rows_replaced_linear(out, found[0], rows_out, self.out_proj), {}

    def reference_forward(self, x, kv, ctx):
        """Naive Longformer: loop-built masks, dense scores, the global rows from Q_g, K_g, V_g."""
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, ctx.q_index, ctx.k_index)
        out = self.reference(q, k, v, ctx)

        def every_key(sub):
            return loop_mask(lambda h, i, j: True, sub.q_index, sub.k_index, 1, sub.causal, sub.key_valid)

        found = self._global_queries(x, ctx)
        if found is not None:
            out = out.index_copy(2, found[0], self._global_rows_dense(found, kv, every_key))
        return self.out_proj(merge_heads(out))

    def reference_rule(self, ctx, tk):
        gl, w, m = self.cfg.global_local, self.window, ctx.n_mem

        def rule(h, i, j):
            if i - m in gl.global_positions or j - m in gl.global_positions:
                return True
            if h < gl.dilated_heads:
                return j in range(i - w * gl.dilation, i + w * gl.dilation + 1, gl.dilation)
            return j in range(i - w, i + w + 1)

        return rule


@register("attention", "bigbird")
class BigBirdAttention(PatternAttention):
    """BigBird block-sparse attention (Zaheer et al. 2020, sec. 2 and App. D, BigBird-ITC).

    Keys and queries are grouped in blocks of b = ``global_local.block_size`` (key-sequence indices;
    a short last block is fine); a query in block a = floor(i / b) attends to
        window:  key blocks a - w_b .. a + w_b  (w_b = ``window_blocks``; 3 blocks for w_b = 1)
        global:  every key if i is a global token; every global token j (ITC: existing tokens made
                 global, ``global_positions`` counted from the segment start)
        random:  r = ``n_random`` key blocks per query block and head, drawn with a fixed seed per
                 layer (``seed``): a deterministic hash of (seed, layer, head, a, t), t < r, picks a
                 block uniformly among the nb = ceil(N / b) blocks; causal: among the preceding blocks
                 0 .. a - 1 (the restriction of the pattern to j <= i, so no random key is wasted).
                 The picks are precomputed into an (H, nb, r) int32 table (``random_blocks``) that the
                 dense mask and the FlexAttention mask_mod both only index.
    causal adds j <= i. Random blocks may coincide with window blocks.
    """

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        gl = cfg.global_local
        if gl.block_size < 1 or gl.window_blocks < 0 or gl.n_random < 0:
            raise ValueError(f"attention='bigbird' needs global_local.block_size >= 1, window_blocks >= 0 and "
                             f"n_random >= 0; got block_size={gl.block_size}, window_blocks={gl.window_blocks}, "
                             f"n_random={gl.n_random}")
        _check_globals("bigbird", cfg)

    def _random_block(self, h, a, t, n_blocks, causal):
        """The t-th random key block of query block a in head h (ints or tensors alike)."""
        seed = self.cfg.global_local.seed
        eligible = a if causal else n_blocks
        return mix_hash(seed, self.layer, h, a, t) % eligible

    def random_blocks(self, n_blocks: int, causal: bool) -> torch.Tensor:
        """(H, nb, r) int32 table of the random key blocks (``_random_block`` for every head, query block
        and draw; -1 = none, for causal query block 0). The hash runs here, once per pattern, in int64 on
        the CPU; the mask_mod only indexes this table (Triton/Inductor would otherwise have to compile the
        int64 multiply/xor/shift hash into every FlexAttention kernel, which failed to compile on CUDA)."""
        h = torch.arange(self.n_heads).view(-1, 1, 1)
        a = torch.arange(n_blocks).view(1, -1, 1)
        t = torch.arange(self.cfg.global_local.n_random).view(1, 1, -1)
        eligible = a if causal else torch.full_like(a, n_blocks)
        x = mix_hash(self.cfg.global_local.seed, self.layer, h, a, t)
        return torch.where(eligible > 0, x % eligible.clamp(min=1), -1).to(torch.int32)

    def pattern(self, ctx, tk):
        gl = self.cfg.global_local
        bs, wb, n_rand, glob, m = gl.block_size, gl.window_blocks, gl.n_random, tuple(gl.global_positions), ctx.n_mem
        n_blocks, causal = -(-tk // bs), ctx.causal

        def rule(h, i, j, rand=None):
            a, c = block_of(i, bs), block_of(j, bs)
            allowed = ((a - c).abs() <= wb) | is_global(i - m, glob) | is_global(j - m, glob)
            for t in range(n_rand):                            # rand: (r, H, nb), two tensor indices
                allowed = allowed | (c == rand[t][h, a])        # -1 (no random block) never matches
            return allowed

        key = ("bigbird", bs, wb, n_rand, glob, m, gl.seed, self.layer, n_blocks, causal)
        tables = {"rand": self.random_blocks(n_blocks, causal).permute(2, 0, 1).contiguous()} if n_rand else {}
        return Pattern(rule, key, per_head=n_rand > 0, tables=tables)

    def reference_rule(self, ctx, tk):
        gl = self.cfg.global_local
        bs, m = gl.block_size, ctx.n_mem
        n_blocks = -(-tk // bs)

        def rule(h, i, j):
            if i - m in gl.global_positions or j - m in gl.global_positions:
                return True
            a, c = i // bs, j // bs
            if abs(a - c) <= gl.window_blocks:
                return True
            eligible = a if ctx.causal else n_blocks
            chosen = {self._random_block(h, a, t, n_blocks, ctx.causal) for t in range(gl.n_random)} if eligible else set()
            return c in chosen

        return rule


def _alias(t):
    """A tensor on ``t``'s memory with its own version counter (``detach`` would share ``t``'s)."""
    with torch.no_grad():
        return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class _BorrowedKeys(torch.autograd.Function):
    """ETC's global stage, softmax(q [gk; k]^T * scale) [gv; v] (SDPA, optional boolean mask) for the n_g global
    queries, with the keys / values read from ``buffers`` = ([gk; k], [gv; v]): rows of the layer's key and value
    buffers (filled outside autograd), not a copy of its own.

    The inputs gk, k, gv, v only carry autograd's edges; the buffers are saved through aliases (their version moves
    when the u rows are written, not the rows read here). Backward recomputes this small attention (n_g queries). The
    gradient of k (v) is added in place into ``sink["k"]`` (``sink["v"]``) when the l2g + l2l stage left it there
    (``_KeysInBuffer``: its own gradient of the same tensor, which autograd holds until this backward has run), so
    the two (B, H, N, dh) contributions are not kept side by side and summed into a third; otherwise it is returned."""

    @staticmethod
    def forward(ctx, q, gk, k, gv, v, buffers, mask, scale, sink):
        keys, values = buffers
        # saved as aliases with their own version counters: released after backward like any saved tensor, and
        # not invalidated by the later writes of u's rows into other rows of the same buffers
        ctx.save_for_backward(q, _alias(keys), _alias(values), *(() if mask is None else (mask,)))
        ctx.scale, ctx.n_g, ctx.sink = scale, gk.shape[2], sink
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    @staticmethod
    def backward(ctx, grad):
        q, keys, values, *mask = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, keys, values))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0] if mask else None, scale=ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        n, local = ctx.n_g, {}
        for name, d in (("k", dk), ("v", dv)):
            held = ctx.sink.pop(name, None)
            if held is not None:
                held.add_(d[:, :, n:])
            local[name] = d[:, :, n:] if held is None else None
        return dq, dk[:, :, :n], local["k"], dv[:, :, :n], local["v"], None, None, None, None


class _KeysInBuffer(torch.autograd.Function):
    """The layer's [u; x_g; x_l] key (or value) buffer, filled outside autograd, as the l2g + l2l attention's input:
    its gradient goes to u's rows and to the local rows as views (the x_g rows are masked there, no gradient), with
    no clone of the whole buffer's gradient per write (what in-place writes under autograd would cost). With a
    ``sink`` and ``name``, the local rows' gradient is also left there for ``_BorrowedKeys`` to add into (the global
    stage read the same local tensor; its backward always runs after this one, since it needs u's gradient)."""

    @staticmethod
    def forward(ctx, u_rows, local, buffer, sink, name):
        ctx.n_u, ctx.sink, ctx.name = u_rows.shape[2], sink, name
        return buffer[0].detach()

    @staticmethod
    def backward(ctx, grad):
        local = grad[:, :, 2 * ctx.n_u:]
        if ctx.name is not None:
            ctx.sink[ctx.name] = local
        return grad[:, :, :ctx.n_u], local, None, None, None


@register("attention", "etc")
class ETCAttention(PatternAttention):
    """ETC global-local attention (Ainslie et al. 2020, sec. 3.1, Fig. 2).

    Two inputs: the long (local) input x_l (the segment, plus any XL memory) and a small global input
    x_g of n_g = ``global_local.n_global_tokens`` tokens. Here x_g is n_g learned vectors per layer (a
    parameter; the paper derives them from sentences/segments of the input). Attention is split in
    four pieces, all softmax(q k^T / sqrt(d)) v with shared projections:

        g2g + g2l:  every global token attends to all global and all (valid) local tokens:
                    u = x_g + W_o Attn(x_g W_q, [x_g; x_l] W_k, [x_g; x_l] W_v)
        l2g + l2l:  local token i attends to every global token (of u) and to the local tokens j with
                    |i - j| <= r (r = ``global_local.window``):
                    y_i = Attn(x_i W_q, [u; x_l] W_k, [u; x_l] W_v) restricted to {globals} U {|i - j| <= r}

    The block interface carries one sequence between layers, so the updated global states u feed the
    same layer's l2g attention (instead of the next layer's global input) and only the local sequence
    is returned. Global tokens have no position (rotary is applied to the local tokens only); score
    positions are not supported. Causal use is rejected: g2l lets the globals read every local token
    and l2g hands that to every query, future included.
    """

    supports_causal = False
    causal_note = ("Its global tokens attend to the whole input (g2l) and every local token reads them (l2g), "
                   "so information flows from later tokens to earlier ones; longformer or bigbird are causal.")
    position_hooks = frozenset({"input", "rotary"})

    def __init__(self, cfg, layer, position):
        super().__init__(cfg, layer, position)
        self.global_tokens = nn.Parameter(torch.randn(cfg.global_local.n_global_tokens, cfg.d_model) * 0.02)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        gl = cfg.global_local
        if gl.n_global_tokens < 1 or gl.window < 0:
            raise ValueError(f"attention='etc' needs global_local.n_global_tokens >= 1 and window (the l2l radius) "
                             f">= 0; got n_global_tokens={gl.n_global_tokens}, window={gl.window}")

    def pattern(self, ctx, tk):
        radius, n_g = self.cfg.global_local.window, self.cfg.global_local.n_global_tokens

        def rule(h, i, j):      # keys [u; x_g; local] at indices [-2 n_g, -n_g), [-n_g, 0), [0, ...)
            return (j < -n_g) | ((j >= 0) & ((i - j).abs() <= radius))

        return Pattern(rule, ("etc", radius, n_g))

    def reference_rule(self, ctx, tk):
        radius = self.cfg.global_local.window
        return lambda h, i, j: j < 0 or j in range(i - radius, i + radius + 1)

    def forward(self, x, kv, ctx):
        """Both stages on one key buffer and one value buffer per call, laid out [u; x_g; x_l] (B, H, 2 n_g + N, dh):
        the global stage (g2g + g2l) reads its keys [x_g; x_l] W_k as a view of rows n_g.. (``_BorrowedKeys``:
        no copy of the local keys of its own), then u's keys are written into rows ..n_g and the l2g + l2l
        attention runs over the whole buffer with the x_g rows masked out (``pattern``). One (B, H, N, dh) copy of
        the local keys and one of the values in all, not two. Under rotary the global tokens read the local keys
        before rotation and the local queries after it, so the global stage gets its own copy there."""
        q, k, v = self.project(x, kv)
        k_plain = k
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, ctx.q_index, ctx.k_index)
        b, h, n, dh = k.shape
        g = self.global_tokens[None].expand(b, -1, -1).to(k.dtype)
        n_g = g.shape[1]
        gq, gk, gv = self.project(g, g)
        k_buf, v_buf = k.new_empty(b, h, 2 * n_g + n, dh), v.new_empty(b, h, 2 * n_g + n, dh)
        with torch.no_grad():                # autograd sees these rows through the two Functions below
            k_buf[:, :, n_g:2 * n_g], v_buf[:, :, n_g:2 * n_g] = gk, gv
            k_buf[:, :, 2 * n_g:], v_buf[:, :, 2 * n_g:] = k, v
            g_keys = k_buf[:, :, n_g:] if k_plain is k else torch.cat([gk, k_plain], 2)
        valid = None                         # validity of the buffer's keys [u; x_g; x_l]
        if ctx.key_valid is not None:
            valid = torch.cat([ctx.key_valid.new_ones(b, 2 * n_g), ctx.key_valid], 1)
        mask = None if valid is None else valid[:, None, None, n_g:]      # the global stage's [x_g; x_l]
        sink: dict = {}                      # local rows' gradients shared by the two stages (see _BorrowedKeys)
        out_g = _BorrowedKeys.apply(gq, gk, k_plain, gv, v, (g_keys, v_buf[:, :, n_g:]), mask, self.scale, sink)
        u = g + self.out_proj(merge_heads(out_g))                  # the updated global states
        uk, uv = (split_heads(t, h) for t in self.project_kv(u))
        with torch.no_grad():
            k_buf[:, :, :n_g], v_buf[:, :, :n_g] = uk, uv
        k_all = _KeysInBuffer.apply(uk, k, (k_buf,), sink, "k" if k_plain is k else None)   # rotary: two tensors
        v_all = _KeysInBuffer.apply(uv, v, (v_buf,), sink, "v")
        k_index = torch.cat([torch.arange(-2 * n_g, 0, device=ctx.k_index.device), ctx.k_index])
        out = self.attend_pattern(q, k_all, v_all, ctx, self.pattern(ctx, k_all.shape[2]), k_index, valid, 2 * n_g)
        return self.out_proj(merge_heads(out)), {}

    def reference_forward(self, x, kv, ctx):
        """Naive ETC: the same two stages with dense scores and loop-built masks (tests compare)."""
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, ctx.q_index, ctx.k_index)
        b, n_g = kv.shape[0], self.global_tokens.shape[0]
        g = self.global_tokens[None].expand(b, -1, -1).to(kv.dtype)
        gq, gk, gv = self.project(g, torch.cat([g, kv], 1))
        g_mask = torch.ones(b, 1, n_g, gk.shape[2], dtype=torch.bool)
        for row in range(b):
            for key in range(kv.shape[1]):
                g_mask[row, :, :, n_g + key] = ctx.key_valid is None or bool(ctx.key_valid[row, key])
        u = g + self.out_proj(merge_heads(dense_attention(gq, gk, gv, g_mask, self.scale)))
        uk, uv = self.project_kv(u)
        k = torch.cat([split_heads(uk, self.n_heads), k], 2)
        v = torch.cat([split_heads(uv, self.n_heads), v], 2)
        k_index = torch.tensor(list(range(-n_g, 0)) + ctx.k_index.tolist())
        valid = None if ctx.key_valid is None else torch.cat([torch.ones(b, n_g, dtype=torch.bool), ctx.key_valid], 1)
        mask = loop_mask(self.reference_rule(ctx, k.shape[2]), ctx.q_index, k_index, self.n_heads, False, valid)
        return self.out_proj(merge_heads(dense_attention(q, k, v, mask, self.scale)))

    def attend(self, q, k, v, ctx):
        raise RuntimeError("attention='etc' needs the layer input for its global tokens; call the module")
