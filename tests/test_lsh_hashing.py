"""Triton LSH hashing kernel (rlformer.attention.lsh_hashing) against the matmul path of ``lsh.lsh_buckets``.

On CPU the kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1; CI has no Triton and skips
it); on CUDA compiled. The kernel's products are float32-accurate, not bit-equal to a float32 matmul: the tests
check that every chosen bucket is an argmax of [xR; -xR] up to float32 rounding (against float64), that nearly all
buckets equal the matmul path's, and that scaling x by powers of two (exact in float32) changes nothing.
"""
from __future__ import annotations

import pytest
import torch
from triton_interpreter import compare_interpreted

from rlformer.attention import lsh_hashing
from rlformer.attention.lsh import lsh_buckets

torch.set_num_threads(1)
needs_triton = pytest.mark.skipif(lsh_hashing.triton is None, reason="Triton not installed")
# (batch, heads, T, d_head, rounds, n_buckets / 2): T and the columns not multiples of the kernel's blocks, one column
CASES = [(2, 3, 150, 16, 2, 4), (1, 2, 70, 32, 3, 100), (1, 1, 64, 16, 1, 1), (2, 2, 200, 64, 2, 128)]


def compare(b, h, t, d, n_rounds, half, device="cpu", dtype=torch.float32) -> dict:
    """Errors of the kernel's buckets for one case (x in split_heads' (B, T, H, dh) storage)."""
    g = torch.Generator().manual_seed(b * 1000 + t)
    x = torch.randn(b, t, h, d, generator=g).to(device, dtype).transpose(1, 2)
    rot = torch.randn(h, n_rounds, d, half, generator=g)
    got = lsh_hashing.hash_buckets(x, rot).cpu()
    matmul = lsh_buckets(x, rot, max_elements=1 << 22).cpu()                  # max_elements: the matmul path
    rotated = torch.einsum("bhtd,hrdn->bhrtn", x.double().cpu(), rot.double())
    both = torch.cat([rotated, -rotated], -1)                                   # [xR; -xR], float64
    chosen = torch.take_along_dim(both, got[..., None], -1)[..., 0]
    slack = (both.max(-1).values - chosen) / both.abs().amax(-1).clamp(min=1e-30)
    return {"shape_ok": got.shape == (b, h, n_rounds, t) and got.dtype == torch.long,
            "in_range": bool(got.min() >= 0 and got.max() < 2 * half),
            "max_relative_slack": slack.max().item(), "agree_with_matmul": (got == matmul).float().mean().item(),
            "scale_invariant": all(torch.equal(lsh_hashing.hash_buckets(x * s, rot).cpu(), got)
                                   for s in (0.25, 8.0))}


def check(errors: dict) -> None:
    assert errors["shape_ok"] and errors["in_range"] and errors["scale_invariant"], errors
    assert errors["max_relative_slack"] < 1e-5, errors                     # an argmax up to float32 rounding
    assert errors["agree_with_matmul"] > 0.999, errors


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the compiled kernel (the test below)")
def test_interpreted_kernel_hashes_like_the_matmul_path():
    """All CASES in Triton's interpreter on CPU (one subprocess)."""
    for errors in compare_interpreted("test_lsh_hashing", timeout=600):
        check(errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_hashes_like_the_matmul_path(case, dtype):
    assert lsh_hashing.available(torch.empty(1, 1, 1, case[3], device="cuda", dtype=dtype))
    check(compare(*case, device="cuda", dtype=dtype))


def test_cpu_and_float64_take_the_matmul_path(monkeypatch):
    """The kernel is for CUDA float32 / 16-bit inputs only: on CPU (and in float64) lsh_buckets hashes with the
    matmul, whatever the kernel would do."""
    assert not lsh_hashing.available(torch.empty(1, 1, 4, 16))
    monkeypatch.setattr(lsh_hashing, "hash_buckets", lambda *a: pytest.fail("kernel called for a CPU tensor"))
    x, rot = torch.randn(1, 2, 9, 16, dtype=torch.float64), torch.randn(2, 1, 16, 3)
    scores = torch.einsum("bhtd,hrdn->bhrtn", x, rot.double())
    assert torch.equal(lsh_buckets(x, rot), torch.cat([scores, -scores], -1).argmax(-1))
