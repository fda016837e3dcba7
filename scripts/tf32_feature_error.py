"""How much TF32 exponent matmuls cost Performer's features in accuracy, emulated on the CPU.

    python scripts/tf32_feature_error.py

Performer's exponents are a = x . w d^{-1/4} plus per-feature biases (+|w|^2 / 2 ~ d / 2 for queries, -|k~|^2 / 2
- |w|^2 / 2 - log(m) / 2 for keys). TF32 rounds matmul inputs to 10 mantissa bits (emulated here by rounding float32
bit patterns), an error relative to each term's size, so a bias of ~32 folded into the matmul as an augmented column
becomes an absolute error in a, i.e. a relative error in every feature exp(a). Prints the relative error (Frobenius)
of phi = exp(a) against float64 for: biases folded into the TF32 matmul, biases added exactly after a TF32 matmul of
x alone (what ``random_features._exponents`` does), and the bf16 rounding of the features themselves, for bf16
inputs of scale 1 and 2 (d = 64, m = 256 orthogonal features, 4096 tokens).
"""
from __future__ import annotations

import math

import torch

from rlformer.attention.random_features import orthogonal_gaussian


def tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10 mantissa bits (round half up on the dropped 13 bits)."""
    bits = x.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def folded(x, extra, w):
    return tf32(torch.cat([x, extra], -1).float()).double() @ tf32(w.float()).double().T


def split(x, extra, w):
    d = x.shape[-1]
    return tf32(x.float()).double() @ tf32(w[:, :d].float()).double().T + extra.float().double() @ w[:, d:].T


def main() -> None:
    torch.manual_seed(0)
    d, m, t = 64, 256, 4096
    w = orthogonal_gaussian(1, m, d)[0].double()
    ws, half = w * d ** -0.25, 0.5 * (w ** 2).sum(-1)
    one = torch.ones(t, 1, dtype=torch.float64)
    wq = torch.cat([ws, half[:, None]], -1)
    wk = torch.cat([ws, torch.ones(m, 1, dtype=torch.float64), (-half - 0.5 * math.log(m))[:, None]], -1)
    for scale in (1.0, 2.0):
        q, k = ((torch.randn(t, d) * scale).bfloat16().double() for _ in range(2))
        sq = -0.5 * (k * k).sum(-1, keepdim=True) * d ** -0.5
        aq = q @ ws.T + half
        ref_q = (aq - aq.amax(-1, keepdim=True)).exp()
        ref_k = (k @ ws.T + sq - half - 0.5 * math.log(m)).exp()
        for name, fn in (("folded into the TF32 matmul", folded), ("added exactly (rlformer)", split)):
            a_q = fn(q, one, wq)
            phi_q = (a_q - a_q.amax(-1, keepdim=True)).exp()
            phi_k = fn(k, torch.cat([sq, one], -1), wk).exp()
            eq = float((phi_q - ref_q).norm() / ref_q.norm())
            ek = float((phi_k - ref_k).norm() / ref_k.norm())
            print(f"scale {scale}, biases {name}: query features {eq:.2e}, key features {ek:.2e}")
        rounding = float((ref_q.bfloat16().double() - ref_q).norm() / ref_q.norm())
        print(f"scale {scale}: bf16 rounding of the query features {rounding:.2e}")


if __name__ == "__main__":
    main()
