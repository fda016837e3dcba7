"""Memorizing Transformer kNN memory (Wu et al. 2022) with an optional SPALM gate (Yogatama et al. 2021).

Every layer keeps a Transformer-XL cache of ``mem_len`` states (the local context); one layer
near the top (``knn.layer``) also keeps an external store of up to ``knn.capacity`` past
(key, value) pairs per batch row. Each query of that layer retrieves its top-k keys from the
store (L2-normalized queries and keys, so the top-k by inner product are the nearest by L2),
attends over them, and the result is mixed with local attention by a learned gate.
"""
from __future__ import annotations

import dataclasses
import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.attention.base import Attention, merge_heads
from rlformer.config import EncoderConfig
from rlformer.memory.xl import XLMemory
from rlformer.registry import available, lookup, register


def _faiss():
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


# ---------------------------------------------------------------- retrieval


@torch.no_grad()
def topk_search(q: Tensor, keys: Tensor, valid: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Top-k stored keys by inner product for each query: batched matmul + top-k, chunked over the store.

    q: (B, H, T, dh), keys: (B, H, S, dh), valid: (B, S). Returns indices (B, H, T, k') into the
    store, k' = min(k, S), best first, and their validity (False where fewer than k' valid keys).
    """
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    n = keys.shape[2]
    for start in range(0, n, chunk):
        part = keys[:, :, start:start + chunk]
        scores = (q @ part.transpose(-1, -2)).float()
        scores = scores.masked_fill(~valid[:, None, None, start:start + part.shape[2]], float("-inf"))
        s, i = scores.topk(min(k, scores.shape[-1]), dim=-1)
        i = i + start
        if best_s is not None:
            s, j = torch.cat([best_s, s], dim=-1).topk(min(k, best_s.shape[-1] + s.shape[-1]), dim=-1)
            i = torch.gather(torch.cat([best_i, i], dim=-1), -1, j)
        best_s, best_i = s, i
    return best_i, torch.isfinite(best_s)


@torch.no_grad()
def faiss_search(q: Tensor, keys: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk_search`` through faiss exact inner-product indexes (IndexFlatIP), one per (row, head)."""
    faiss = _faiss()
    if faiss is None:
        raise ValueError("knn.use_faiss=True but faiss is not installed; `pip install faiss-cpu` (or faiss-gpu) "
                         "or set knn.use_faiss=False to use the batched matmul/top-k search")
    b, h, t, dh = q.shape
    kk = min(k, keys.shape[2])
    idx = torch.zeros(b, h, t, kk, dtype=torch.long)
    ok = torch.zeros(b, h, t, kk, dtype=torch.bool)
    for row in range(b):
        where = valid[row].nonzero().squeeze(1).cpu()
        if where.numel() == 0:
            continue
        for head in range(h):
            index = faiss.IndexFlatIP(dh)
            index.add(keys[row, head, where.to(keys.device)].float().cpu().numpy())
            _, found = index.search(q[row, head].float().cpu().numpy(), kk)
            found = torch.from_numpy(found)
            ok[row, head] = found >= 0
            idx[row, head] = where[found.clamp_min(0)]
    return idx.to(q.device), ok.to(q.device)


def gather_store(store: Tensor, idx: Tensor) -> Tensor:
    """store (B, H, S, dh), idx (B, H, T, k) -> (B, H, T, k, dh)."""
    b, h, t, k = idx.shape
    flat = idx.reshape(b, h, t * k, 1).expand(-1, -1, -1, store.shape[-1])
    return torch.gather(store, 2, flat).reshape(b, h, t, k, store.shape[-1])


def retrieved_attention(q: Tensor, keys: Tensor, values: Tensor, idx: Tensor, ok: Tensor,
                        temperature: Tensor) -> tuple[Tensor, Tensor]:
    """Attention of normalized queries over their retrieved items (Wu et al. 2022, sec. 3.1).

    softmax_j(tau_h q.k_j) v_j over the valid retrieved j; returns (B, H, T, dh) and (B, H, T, 1),
    True where the query retrieved anything (rows without memory get 0).
    """
    k_ret, v_ret = gather_store(keys, idx), gather_store(values, idx)
    logits = torch.einsum("bhtd,bhtkd->bhtk", q, k_ret) * temperature[None, :, None, None]
    logits = logits.masked_fill(~ok, torch.finfo(logits.dtype).min)
    out = torch.einsum("bhtk,bhtkd->bhtd", torch.softmax(logits, dim=-1), v_ret)
    has = ok.any(dim=-1, keepdim=True)
    return torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device)), has


def knn_reference(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, k: int,
                  temperature: Tensor) -> Tensor:
    """Naive reference for search + ``retrieved_attention``: per query, sort every valid key by score."""
    b, h, t, dh = q.shape
    rows = []
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                cand = [j for j in range(keys.shape[2]) if bool(valid[bi, j])]
                if not cand:
                    rows.append(torch.zeros(dh, dtype=q.dtype))
                    continue
                scores = torch.stack([q[bi, hi, ti] @ keys[bi, hi, j] for j in cand])
                top = torch.argsort(scores.detach(), descending=True)[:k]
                w = torch.softmax(temperature[hi] * scores[top], dim=0)
                rows.append(sum(w[n] * values[bi, hi, cand[int(j)]] for n, j in enumerate(top)))
    return torch.stack(rows).reshape(b, h, t, dh)


def write_store(store: dict, k_new: Tensor, v_new: Tensor, valid_new: Tensor, capacity: int) -> dict:
    """Append a segment's (key, value) pairs to each row's ring buffer (oldest out first).

    store: {} or keys/values (B, H, S, dh), valid (B, S), ptr (B,) (next write position; a reset
    row has ptr 0 and nothing valid). S grows with the writes up to ``capacity``, then stays.
    """
    b, h, t, dh = k_new.shape
    keep = min(t, capacity)
    skip = t - keep
    k_new, v_new, valid_new = k_new[:, :, skip:], v_new[:, :, skip:], valid_new[:, skip:]
    keys, values, valid = store.get("keys"), store.get("values"), store.get("valid")
    if keys is None:
        keys = k_new.new_zeros(b, h, 0, dh)
        values = v_new.new_zeros(b, h, 0, dh)
        valid = torch.zeros(b, 0, dtype=torch.bool, device=k_new.device)
        ptr = torch.zeros(b, dtype=torch.long, device=k_new.device)
    else:
        ptr = store["ptr"]
    size = keys.shape[2]
    grow = min(capacity, size + t) - size
    if grow > 0:
        keys = torch.cat([keys, keys.new_zeros(b, h, grow, dh)], dim=2)
        values = torch.cat([values, values.new_zeros(b, h, grow, dh)], dim=2)
        valid = torch.cat([valid, valid.new_zeros(b, grow)], dim=1)
    pos = (ptr[:, None] + skip + torch.arange(keep, device=ptr.device)[None]) % capacity     # (B, keep)
    idx = pos[:, None, :, None].expand(b, h, keep, dh)
    return {"keys": keys.scatter(2, idx, k_new), "values": values.scatter(2, idx, v_new),
            "valid": valid.scatter(1, pos, valid_new), "ptr": (ptr + t) % capacity}


# ---------------------------------------------------------------- the kNN-augmented attention


class KNNAttention(nn.Module):
    """A layer's attention plus kNN retrieval from its external memory (Wu et al. 2022, sec. 3.1).

    Local: the wrapped mechanism over [XL cache; segment]. Memory: queries and keys L2-normalized,
    top-k retrieved per query and head, softmax(tau_h q^.k^) over them (tau_h a learned per-head
    temperature, init sqrt(d_head), because cosine scores live in [-1, 1]). Mixing per head:
    gate: V_a = g V_m + (1 - g) V_c, g = sigmoid(b_g) a learned scalar per head (sec. 3.1);
    spalm: g_t = sigmoid(w^T h_t + b) per token from the local context h_t (merged local heads),
    z_t = g_t m_t + (1 - g_t) h_t (Yogatama et al. 2021, sec. 3). Queries with nothing to
    retrieve use local attention only. The segment's keys/values are written, detached, after
    the segment is processed, so no query sees its own segment through the store.
    """

    def __init__(self, cfg: EncoderConfig, inner: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.inner = inner
        self.layer = getattr(inner, "layer", 0)
        self.log_temperature = nn.Parameter(torch.full((cfg.n_heads,), 0.5 * math.log(cfg.d_head)))
        if cfg.knn.mix == "gate":
            self.gate_bias = nn.Parameter(torch.zeros(cfg.n_heads))
        else:
            self.gate = nn.Linear(cfg.d_model, 1)

    def search(self, q: Tensor, store: dict) -> tuple[Tensor, Tensor]:
        knn = self.cfg.knn
        if knn.use_faiss:
            return faiss_search(q, store["keys"], store["valid"], knn.topk)
        return topk_search(q, store["keys"], store["valid"], knn.topk, knn.chunk)

    def forward(self, x: Tensor, kv: Tensor, ctx):
        inner = self.inner
        q, k, v = inner.project(x, kv)
        qr, kr = q, k
        if inner.position is not None and "rotary" in inner.position.hooks:
            qr, kr = inner.position.rotate(q, k, ctx.q_index, ctx.k_index)
        local, inner_state = inner.attend(qr, kr, v, dataclasses.replace(ctx, state=ctx.state.get("inner", {})))
        out = local
        qn = F.normalize(q, dim=-1)
        store = ctx.state.get("store", {})
        if store.get("keys") is not None:
            idx, ok = self.search(qn.detach(), store)
            mem, has = retrieved_attention(qn, store["keys"], store["values"], idx, ok, self.log_temperature.exp())
            if self.cfg.knn.mix == "gate":
                g = torch.sigmoid(self.gate_bias)[None, :, None, None]
            else:
                g = torch.sigmoid(self.gate(merge_heads(local)))[:, None]          # (B, 1, T, 1)
            g = g * has.to(g.dtype)
            out = g * mem + (1 - g) * local
        n_mem = ctx.n_mem
        seg_valid = (torch.ones(k.shape[0], k.shape[2] - n_mem, dtype=torch.bool, device=k.device)
                     if ctx.key_valid is None else ctx.key_valid[:, n_mem:])
        new_store = write_store(store, F.normalize(k[:, :, n_mem:], dim=-1).detach(), v[:, :, n_mem:].detach(),
                                seg_valid, self.cfg.knn.capacity)
        return inner.out_proj(merge_heads(out)), {"inner": inner_state, "store": new_store}


@register("memory", "knn")
class KNNMemory(XLMemory):
    """Memorizing Transformer (Wu et al. 2022): XL cache in every layer + kNN memory in one layer.

    Sec. 3: a Transformer-XL cache of ``mem_len`` gives every layer its local context;
    layer ``knn.layer`` (negative counts from the top, -2 = the paper's choice of a layer near the
    top) attends additionally to the top-k (key, value) pairs retrieved from an external,
    non-differentiable store of up to ``knn.capacity`` pairs per batch row (ring buffer, oldest
    out first), mixed by a learned per-head gate (sec. 3.1) or a SPALM token gate (Yogatama et
    al. 2021). Retrieval is exact: batched matmul + top-k over the store in chunks of
    ``knn.chunk`` (or faiss IndexFlatIP with ``knn.use_faiss``). The store lives in the layer's
    attention state: keys/values (B, H, S, dh), valid (B, S), ptr (B,).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.knn_layer = cfg.knn.layer % cfg.n_layers

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        knn = cfg.knn
        if not -cfg.n_layers <= knn.layer < cfg.n_layers:
            raise ValueError(f"knn.layer={knn.layer} is outside the {cfg.n_layers} layers; use an index in "
                             f"[{-cfg.n_layers}, {cfg.n_layers - 1}] (negative counts from the top, -2 = second "
                             f"from the top)")
        if knn.capacity < 1 or knn.topk < 1 or knn.chunk < 1:
            raise ValueError(f"knn.capacity, knn.topk and knn.chunk must be >= 1; got {knn.capacity}, {knn.topk}, "
                             f"{knn.chunk}")
        if knn.mix not in ("gate", "spalm"):
            raise ValueError(f"knn.mix={knn.mix!r} is not a mixing mode; use 'gate' (Memorizing Transformer) or "
                             f"'spalm' (Yogatama et al. 2021)")
        if cfg.mem_len < 1:
            raise ValueError(f"memory='knn' needs mem_len >= 1 (the XL cache of the local context), got {cfg.mem_len}")
        att = lookup("attention", cfg.attention)
        if att.forward is not Attention.forward:
            ok = [n for n in available()["attention"] if lookup("attention", n).forward is Attention.forward
                  and lookup("attention", n).supports_memory]
            raise ValueError(f"memory='knn' splits layer {knn.layer}'s attention into projections, the local "
                             f"attend(q, k, v) and retrieval, but attention={cfg.attention!r} computes its "
                             f"output in its own forward; use an attention in {ok}")
        if knn.use_faiss and _faiss() is None:
            raise ValueError("knn.use_faiss=True but faiss is not importable; `pip install faiss-cpu` (or "
                             "faiss-gpu), or set knn.use_faiss=False for the batched matmul/top-k search")

    def wrap_attention(self, layer, attention):
        return KNNAttention(self.cfg, attention) if layer == self.knn_layer else attention
