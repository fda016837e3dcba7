"""Random-feature attention: Performer FAVOR+ (Choromanski et al. 2021) and RFA (Peng et al. 2021).

Both replace exp(q . k) by phi(q) . phi(k) with random features phi, so attention becomes
linear in T:  out_t = phi(q_t)^T S_t / phi(q_t)^T z_t,  S_t = sum_s phi(k_s) v_s^T,
z_t = sum_s phi(k_s), the sums running over s <= t when causal and over all s otherwise.

Causal sums are chunked prefix sums: inside a chunk of ``random_features.chunk_size`` tokens
the masked quadratic form (phi(Q) phi(K)^T * tril) V; across chunks the carried sums. Memory
is O(T * (chunk + m * dh / chunk)), never O(T^2). The sums at the end of a segment are the
recurrent state ({"S": (B, H, M, dh), "z": (B, H, M)}, zeros = fresh), so feeding a sequence
step by step with ``state`` equals the full causal pass. The returned state is detached (the
stop-gradient of Transformer-XL's memory): gradients flow within a segment, not into earlier
ones. Bidirectional: global sums (plus the carried state, a memory of earlier segments).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.attention.base import Attention, merge_heads
from rlformer.attention.lsh import Float32Buffers, layer_generator
from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext
from rlformer.registry import register

DEN_EPS = 1e-6
"""RFA's floor of the normalizer phi(q)^T z: trigonometric features can make the estimate <= 0.
Performer's positive features only need a floor for a query with no valid key (a padded token at
the start, z = 0; it then outputs 0), so it uses the dtype's smallest normal number."""


def orthogonal_gaussian(n_heads: int, m: int, d: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(n_heads, m, d) orthogonal random features (Performer sec. 4.2, "regular" variant).

    Blocks of d rows are orthonormal (QR of a Gaussian matrix, signs fixed by diag(R) so that
    the block is Haar-distributed; without it the directions are biased); each row is rescaled by the norm
    of an independent d-dim Gaussian vector, so rows are marginally N(0, I_d) yet orthogonal
    within a block.
    """
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(n_heads, d, d, generator=generator)
        qmat, rmat = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1))[..., None, :]   # Haar (Mezzadri 2007)
        blocks.append(qmat.transpose(-1, -2))
    w = torch.cat(blocks, dim=1)[:, :m]
    norms = torch.randn(n_heads, m, d, generator=generator).norm(dim=-1, keepdim=True)
    return w * norms


def chunked_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int, *,
                             causal: bool, state: Optional[dict] = None,
                             log_gate: Optional[Tensor] = None, den_floor: float = DEN_EPS) -> tuple[Tensor, dict]:
    """Linear attention from features. phi_q, phi_k: (B, H, T, M); v: (B, H, T, dh).

    ``log_gate`` (B, H, T): RFA's gated recurrence S_t = g_t S_{t-1} + phi(k_t) v_t^T with
    g_t = exp(log_gate_t) (the caller folds (1 - g_t) into phi(k_t)); causal only.
    ``den_floor``: lower bound of the normalizer phi(q_t)^T z_t.
    Returns (out (B, H, T, dh) in v's dtype, new state {"S": (B, H, M, dh), "z": (B, H, M)}).
    """
    b, h, t, m = phi_k.shape
    dh = v.shape[-1]
    acc = phi_k.dtype
    vv = v.to(acc)
    s0 = state["S"].to(acc) if state else phi_k.new_zeros(b, h, m, dh)
    z0 = state["z"].to(acc) if state else phi_k.new_zeros(b, h, m)
    if not causal:
        if log_gate is not None:
            raise ValueError("the gated recurrence is causal; use causal=True or no gate")
        s = s0 + torch.einsum("bhtm,bhtd->bhmd", phi_k, vv)
        z = z0 + phi_k.sum(2)
        num = torch.einsum("bhtm,bhmd->bhtd", phi_q, s)
        den = torch.einsum("bhtm,bhm->bht", phi_q, z)
        return (num / den.clamp(min=den_floor)[..., None]).to(v.dtype), {"S": s, "z": z}

    c = chunk_size
    n = -(-t // c)
    pad = n * c - t
    qc = F.pad(phi_q, (0, 0, 0, pad)).reshape(b, h, n, c, m)
    kc = F.pad(phi_k, (0, 0, 0, pad)).reshape(b, h, n, c, m)
    vc = F.pad(vv, (0, 0, 0, pad)).reshape(b, h, n, c, dh)
    tril = torch.ones(c, c, dtype=torch.bool, device=phi_k.device).tril()
    scores = torch.einsum("bhncm,bhnsm->bhncs", qc, kc)                            # (B, H, n, C, C)
    if log_gate is None:
        weights = scores.masked_fill(~tril, 0.0)
        chunk_s = torch.einsum("bhncm,bhncd->bhnmd", kc, vc)
        chunk_z = kc.sum(3)
        s_start = s0[:, :, None] + chunk_s.cumsum(2) - chunk_s                    # sums before each chunk
        z_start = z0[:, :, None] + chunk_z.cumsum(2) - chunk_z
        carry_q = qc
        s_end, z_end = s0 + chunk_s.sum(2), z0 + chunk_z.sum(2)
    else:
        lg = F.pad(log_gate.to(acc), (0, pad)).reshape(b, h, n, c)
        cum = lg.cumsum(-1)                                                         # G_t within the chunk
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~tril, float("-inf")).exp()
        weights = scores * decay
        to_end = (cum[..., -1:] - cum).exp()                                        # prod_{u > s} g_u
        chunk_s = torch.einsum("bhncm,bhncd->bhnmd", kc * to_end[..., None], vc)
        chunk_z = (kc * to_end[..., None]).sum(3)
        total = cum[..., -1].exp()                                                  # prod over the chunk
        s_list, z_list = [], []
        s_run, z_run = s0, z0
        # unbind (one backward node) rather than indexing [:, :, i] in the loop, whose n backward
        # nodes would each materialize a full-size zero gradient: O(n^2) work.
        for tot, cs, cz in zip(total.unbind(2), chunk_s.unbind(2), chunk_z.unbind(2)):
            s_list.append(s_run)
            z_list.append(z_run)
            s_run = tot[..., None, None] * s_run + cs
            z_run = tot[..., None] * z_run + cz
        s_start, z_start = torch.stack(s_list, 2), torch.stack(z_list, 2)
        carry_q = qc * cum.exp()[..., None]                                         # decay since chunk start
        s_end, z_end = s_run, z_run
    num = torch.einsum("bhncs,bhnsd->bhncd", weights, vc) + torch.einsum("bhncm,bhnmd->bhncd", carry_q, s_start)
    den = weights.sum(-1) + torch.einsum("bhncm,bhnm->bhnc", carry_q, z_start)
    out = (num / den.clamp(min=den_floor)[..., None]).reshape(b, h, n * c, dh)[:, :, :t]
    return out.to(v.dtype), {"S": s_end, "z": z_end}


class _GroupRecompute(torch.autograd.Function):
    """Causal linear attention over groups of tokens that keeps only its inputs for backward.

    ``fn(slices, S, z) -> (out, S', z')`` is one group's attention (features + chunked prefix
    sums) from the sums carried into it. Forward runs the groups in order without a graph and
    saves the sequence inputs plus the carried sums at group boundaries ((n_groups, B, H, M, dh),
    a few per thousand tokens). Backward walks the groups in reverse, recomputing each group's
    graph and back-propagating the gradient of the carried sums into the previous group, so the
    feature maps, prefix states and intra-chunk scores live one group at a time. Activation
    memory is O(T * (inputs) + T / group * M * dh) instead of the per-chunk tensors of the whole
    sequence. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, fn, bounds, dims, n_params, s0, z0, *tensors):
        params, seq = tensors[:n_params], tensors[n_params:]
        outs, s_list, z_list = [], [], []
        s, z = s0, z0
        for a, b in bounds:
            s_list.append(s)
            z_list.append(z)
            o, s, z = fn([x.narrow(d, a, b - a) for x, d in zip(seq, dims)], s, z)
            outs.append(o)
        ctx.fn, ctx.bounds, ctx.dims, ctx.params = fn, bounds, dims, params
        ctx.s0_grad, ctx.z0_grad = s0.requires_grad, z0.requires_grad
        ctx.save_for_backward(torch.stack(s_list), torch.stack(z_list), *seq)
        return torch.cat(outs, 2), s, z

    @staticmethod
    def backward(ctx, g_out, g_s, g_z):
        s_all, z_all, *seq = ctx.saved_tensors
        params = [p for p in ctx.params if p.requires_grad]
        seq_grads = [[] for _ in seq]
        param_grads = [torch.zeros_like(p) for p in params]
        for i in reversed(range(len(ctx.bounds))):
            a, b = ctx.bounds[i]
            with torch.enable_grad():
                sl = [x.narrow(d, a, b - a).detach().requires_grad_(x.requires_grad and x.is_floating_point())
                      for x, d in zip(seq, ctx.dims)]
                s_in = s_all[i].detach().requires_grad_()
                z_in = z_all[i].detach().requires_grad_()
                o, s_out, z_out = ctx.fn(sl, s_in, z_in)
            wrt = [t for t in sl if t.requires_grad] + [s_in, z_in] + params
            grads = torch.autograd.grad([o, s_out, z_out], wrt, [g_out[:, :, a:b], g_s, g_z], allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
            it = iter(grads)
            for j, t in enumerate(sl):
                if t.requires_grad:
                    seq_grads[j].append(next(it))
            g_s, g_z = next(it), next(it)
            for j in range(len(params)):
                param_grads[j] += next(it)
        out_seq = [torch.cat(g[::-1], d) if g else None for g, d in zip(seq_grads, ctx.dims)]
        it = iter(param_grads)
        out_params = [next(it) if p.requires_grad else None for p in ctx.params]
        return (None, None, None, None, g_s if ctx.s0_grad else None, g_z if ctx.z0_grad else None,
                *out_params, *out_seq)


def recurrent_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool,
                               state: Optional[dict] = None, log_gate: Optional[Tensor] = None,
                               den_floor: float = DEN_EPS) -> tuple[Tensor, dict]:
    """Reference for ``chunked_linear_attention``: one explicit recurrence step per token (causal),
    or the explicit sums over all tokens (bidirectional)."""
    b, h, t, m = phi_k.shape
    dh = v.shape[-1]
    vv = v.to(phi_k.dtype)
    s = state["S"] if state else phi_k.new_zeros(b, h, m, dh)
    z = state["z"] if state else phi_k.new_zeros(b, h, m)
    if not causal:
        for i in range(t):
            s = s + phi_k[:, :, i, :, None] * vv[:, :, i, None, :]
            z = z + phi_k[:, :, i]
        outs = [(phi_q[:, :, i, :, None] * s).sum(-2) / (phi_q[:, :, i] * z).sum(-1).clamp(min=den_floor)[..., None]
                for i in range(t)]
        return torch.stack(outs, 2).to(v.dtype), {"S": s, "z": z}
    outs = []
    for i in range(t):
        g = 1.0 if log_gate is None else log_gate[:, :, i].exp()[..., None]
        s = (g[..., None] if log_gate is not None else 1.0) * s + phi_k[:, :, i, :, None] * vv[:, :, i, None, :]
        z = g * z + phi_k[:, :, i]
        num = (phi_q[:, :, i, :, None] * s).sum(-2)
        den = (phi_q[:, :, i] * z).sum(-1)
        outs.append(num / den.clamp(min=den_floor)[..., None])
    return torch.stack(outs, 2).to(v.dtype), {"S": s, "z": z}


class RandomFeatureAttention(Float32Buffers, Attention):
    """Shared machinery of Performer and RFA: features, chunked prefix sums, the recurrent state.

    Position hooks: "input" and "rotary" only (random features never form scores, so score and
    value hooks such as ALiBi or Shaw are refused at build time). Rotary rotates q and k at their
    absolute positions (tokens since the row's reset), so the carried state stays consistent
    across segments. No memory prefix: the recurrent state is the memory (supports_memory=False).
    """

    supports_memory = False
    stateful = True
    position_hooks = frozenset({"input", "rotary"})
    feature_multiplier = 1
    """M = feature_multiplier * n_features outputs of phi"""
    float32_buffers = ("features",)

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        self.n_features = cfg.random_features.n_features
        self.recompute_group = cfg.random_features.recompute_group
        """tokens per recomputation group of the causal backward (rounded down to whole chunks; 0: off)"""
        gen = layer_generator(cfg.random_features.seed, layer, salt=3)
        self.register_buffer("features", orthogonal_gaussian(cfg.n_heads, self.n_features, cfg.d_head, gen))

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        rf = cfg.random_features
        if rf.n_features < 1 or rf.chunk_size < 1:
            raise ValueError(f"random_features.n_features={rf.n_features} and chunk_size={rf.chunk_size} must be "
                             f">= 1 (e.g. 64 and 64)")

    def redraw(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw fresh features (Performer's periodic redrawing); the global RNG when no generator."""
        w = orthogonal_gaussian(self.n_heads, self.n_features, self.d_head, generator)
        self.features.copy_(w.to(self.features))

    def feature_map(self, x: Tensor, query: bool) -> Tensor:
        """(B, H, T, dh) -> (B, H, T, M) in float32 (float64 for float64 inputs)."""
        raise NotImplementedError

    def softmax_target(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        """The exact softmax attention that phi(q) . phi(k) estimates (for tests and diagnostics)."""
        raise NotImplementedError

    def log_gates(self, x: Tensor) -> Optional[Tensor]:
        """(B, H, T) log g_t of the gated recurrence, or None."""
        return None

    def _rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        if bool((pos == pos[:1]).all()):
            return self.position.rotate(q, k, pos[0], pos[0])
        pairs = [self.position.rotate(q[i:i + 1], k[i:i + 1], pos[i], pos[i]) for i in range(q.shape[0])]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def forward(self, x: Tensor, kv: Tensor, ctx: AttentionContext) -> tuple[Tensor, dict]:
        if self.training and self.cfg.random_features.redraw:
            self.redraw()
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self._rotate(q, k, ctx.q_pos)
        out, state = self.attend(q, k, v, ctx, self.log_gates(x))
        return self.out_proj(merge_heads(out)), state

    def features_of(self, q: Tensor, k: Tensor, key_valid: Optional[Tensor],
                    log_gate: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(phi(q), phi(k)) with invalid keys zeroed and (1 - g_t) folded into phi(k_t) when gated."""
        phi_q, phi_k = self.feature_map(q, query=True), self.feature_map(k, query=False)
        if key_valid is not None:
            phi_k = phi_k * key_valid[:, None, :, None].to(phi_k.dtype)
        if log_gate is not None:
            phi_k = phi_k * (-torch.expm1(log_gate.to(phi_k.dtype)))[..., None]       # (1 - g_t)
        return phi_q, phi_k

    def feature_params(self) -> list[Tensor]:
        """Parameters the feature map reads (they receive gradients through the recomputation)."""
        return []

    def attend(self, q, k, v, ctx, log_gate: Optional[Tensor] = None):
        params = self.feature_params()
        s0 = ctx.state.get("S") if ctx.state else None
        inputs = [q, k, v, log_gate, s0, *params]
        if (ctx.causal and self.recompute_group > 0 and torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in inputs)):
            return self._attend_recomputed(q, k, v, ctx, log_gate, params)
        phi_q, phi_k = self.features_of(q, k, ctx.key_valid, log_gate)
        out, state = chunked_linear_attention(phi_q, phi_k, v, self.cfg.random_features.chunk_size,
                                              causal=ctx.causal, state=ctx.state or None, log_gate=log_gate,
                                              den_floor=self.den_floor(phi_k.dtype))
        return out, {name: t.detach() for name, t in state.items()}

    def _attend_recomputed(self, q, k, v, ctx, log_gate, params):
        """Causal ``attend`` keeping only q, k, v (and gates) plus group-boundary sums for backward;
        features and prefix sums are recomputed group by group (``_GroupRecompute``)."""
        chunk = self.cfg.random_features.chunk_size
        group = chunk * max(1, self.recompute_group // chunk)       # whole chunks: same partition as one pass
        t = q.shape[2]
        bounds = [(a, min(a + group, t)) for a in range(0, t, group)]
        acc = torch.promote_types(q.dtype, torch.float32)
        m = self.feature_multiplier * self.n_features
        b, h = q.shape[:2]
        state = ctx.state or {}
        s0 = state["S"].to(acc) if state else q.new_zeros(b, h, m, v.shape[-1], dtype=acc)
        z0 = state["z"].to(acc) if state else q.new_zeros(b, h, m, dtype=acc)
        seq, dims = [q, k, v], [2, 2, 2]
        has_valid, has_gate = ctx.key_valid is not None, log_gate is not None
        if has_valid:
            seq.append(ctx.key_valid)
            dims.append(1)
        if has_gate:
            seq.append(log_gate)
            dims.append(2)
        floor = self.den_floor(acc)

        def fn(sl, s, z):
            qg, kg, vg = sl[:3]
            kv = sl[3] if has_valid else None
            lg = sl[-1] if has_gate else None
            phi_q, phi_k = self.features_of(qg, kg, kv, lg)
            out, st = chunked_linear_attention(phi_q, phi_k, vg, chunk, causal=True, state={"S": s, "z": z},
                                               log_gate=lg, den_floor=floor)
            return out, st["S"], st["z"]

        out, s_end, z_end = _GroupRecompute.apply(fn, bounds, dims, len(params), s0, z0, *params, *seq)
        return out, {"S": s_end.detach(), "z": z_end.detach()}

    def reference(self, q, k, v, ctx, log_gate: Optional[Tensor] = None):
        """Naive version of ``attend``: the token-by-token recurrence."""
        phi_q, phi_k = self.features_of(q, k, ctx.key_valid, log_gate)
        return recurrent_linear_attention(phi_q, phi_k, v, causal=ctx.causal, state=ctx.state or None,
                                          log_gate=log_gate, den_floor=self.den_floor(phi_k.dtype))

    def den_floor(self, dtype: torch.dtype) -> float:
        return DEN_EPS


def _softmax_attention(scores: Tensor, v: Tensor, causal: bool) -> Tensor:
    if causal:
        t = scores.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.to(scores.dtype)


@register("attention", "performer")
class PerformerAttention(RandomFeatureAttention):
    """Performer FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

    softmax kernel exp(q . k / sqrt(d)) = E_w[phi(q~) . phi(k~)] with x~ = x d^{-1/4} and (Lemma 1)
        phi(x) = exp(w_r^T x - |x|^2 / 2) / sqrt(m),  r = 1..m,
    w_r orthogonal Gaussian (sec. 4.2; fixed per layer from ``random_features.seed``, redrawn
    every training forward when ``random_features.redraw``). Attention = D^{-1} phi(Q) (phi(K)^T V)
    (eq. 5), causal by prefix sums (sec. 2.3 / chunked here).

    Numerical stabilizers that cancel exactly: query features drop their per-query factor
    exp(-|q|^2/2) and subtract max_r (w_r^T q + |w_r|^2/2); key features are multiplied by
    exp(-|w_r|^2/2) and query features by exp(+|w_r|^2/2), so phi(k) <= 1 (no overflow) and no
    data-dependent key shift enters the carried state.
    """

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        super().validate(cfg)
        if cfg.random_features.gate:
            raise ValueError("random_features.gate is RFA's gated recurrence; use attention='rfa' for gating or "
                             "set random_features.gate=False with attention='performer'")

    def den_floor(self, dtype):
        return torch.finfo(dtype).tiny

    def feature_map(self, x, query):
        acc = torch.promote_types(x.dtype, torch.float32)
        x = x.to(acc) * self.d_head ** -0.25
        w = self.features.to(acc)
        half_w = 0.5 * w.square().sum(-1)[None, :, None, :]                       # |w_r|^2 / 2, (1, H, 1, m)
        proj = torch.einsum("bhtd,hmd->bhtm", x, w)
        if query:
            a = proj + half_w
            return torch.exp(a - a.amax(-1, keepdim=True)) / math.sqrt(self.n_features)
        return torch.exp(proj - 0.5 * x.square().sum(-1, keepdim=True) - half_w) / math.sqrt(self.n_features)

    def softmax_target(self, q, k, v, causal):
        acc = torch.promote_types(q.dtype, torch.float32)
        return _softmax_attention(torch.einsum("bhid,bhjd->bhij", q.to(acc), k.to(acc)) * self.scale, v, causal)


@register("attention", "rfa")
class RFAAttention(RandomFeatureAttention):
    """Random Feature Attention (Peng et al. 2021): trigonometric random features, optional gate.

    Queries and keys are l2-normalized and scaled by a learned per-head sqrt(tau) (RFA's learned
    feature variance), x~ = sqrt(tau) x / |x|; with
        phi(x) = [sin(w_1^T x), ..., sin(w_m^T x), cos(w_1^T x), ..., cos(w_m^T x)] / sqrt(m)
    (eq. 2, Rahimi & Recht 2007), phi(x) . phi(y) estimates exp(-|x - y|^2 / 2) =
    exp(tau (q^ . k^ - 1)), i.e. softmax attention with scores tau q^ . k^ (eq. 4-5). w_r
    orthogonal Gaussian, fixed per layer (redrawn per training forward when ``redraw``).
    Gating (sec. 3.1, ``random_features.gate``, causal only):
        S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T,  z_t = g_t z_{t-1} + (1 - g_t) phi(k_t),
        g_t = sigmoid(w_g^T x_t + b_g) per head, from the layer input x_t (bias starts at 2, g ~ 0.88).
    The normalizer phi(q)^T z can be <= 0 for trigonometric features; it is floored at 1e-6.
    """

    feature_multiplier = 2

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        self.log_tau = nn.Parameter(torch.zeros(cfg.n_heads))
        self.gate = None
        if cfg.random_features.gate:
            self.gate = nn.Linear(cfg.d_model, cfg.n_heads)
            nn.init.constant_(self.gate.bias, 2.0)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        super().validate(cfg)
        if cfg.random_features.gate and not cfg.causal:
            raise ValueError("random_features.gate gates RFA's causal recurrence; set causal=True or gate=False")

    def feature_params(self):
        return [self.log_tau]

    def _scaled(self, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        tau = self.log_tau.to(acc).exp()[None, :, None, None]
        return F.normalize(x.to(acc), dim=-1) * tau.sqrt()

    def feature_map(self, x, query):
        x = self._scaled(x)
        proj = torch.einsum("bhtd,hmd->bhtm", x, self.features.to(x.dtype))
        return torch.cat([proj.sin(), proj.cos()], dim=-1) / math.sqrt(self.n_features)

    def log_gates(self, x):
        if self.gate is None:
            return None
        return F.logsigmoid(self.gate(x)).transpose(1, 2)

    def softmax_target(self, q, k, v, causal):
        return _softmax_attention(torch.einsum("bhid,bhjd->bhij", self._scaled(q), self._scaled(k)), v, causal)
