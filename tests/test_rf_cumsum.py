"""The carried sums' cumsum over segments of the fused random-feature kernels (``random_features_fused._cumsum_``):
equal to torch.cumsum over the slot axis, for slot counts that are and are not multiples of the four slots it reads
per step and column counts that are not multiples of its block, with and without the kept copy of the starts
(slots 0..n-2, rounded to bfloat16 or kept in float32). On CPU in Triton's interpreter (a subprocess), on CUDA
compiled; both skip where Triton does not import (CI)."""
from __future__ import annotations

import pytest
import torch
from triton_interpreter import compare_interpreted

from rlformer.attention import random_features_fused as fused_rf

needs_triton = pytest.mark.skipif(fused_rf.triton is None, reason="Triton does not import here")
CASES = [(slots, cols, keep) for slots in (1, 4, 6, 33) for cols, keep in ((700, None), (1500, "bfloat16"),
                                                                          (300, "float32"))]
"""(slots, columns of s (z has a third as many), kept copy's dtype or None)"""


def compare(slots: int, cols: int, keep, device: str = "cpu") -> dict:
    """Largest absolute errors of s, z (and their kept starts) against torch.cumsum, in units of the largest sum."""
    g = torch.Generator().manual_seed(slots * cols)
    s = torch.randn(slots, cols, generator=g).to(device)
    z = torch.randn(slots, cols // 3, generator=g).to(device)
    ref_s, ref_z = s.double().cumsum(0), z.double().cumsum(0)
    kept = None
    if keep is not None:
        kept = (torch.full((slots - 1, cols), 7.0, device=device, dtype=getattr(torch, keep)),
                torch.full((slots - 1, cols // 3), 7.0, device=device))
    fused_rf._cumsum_(s, z, kept)
    scale = ref_s.abs().max().item()
    errors = {"s": (s.double() - ref_s).abs().max().item() / scale,
              "z": (z.double() - ref_z).abs().max().item() / scale}
    if kept is not None:
        errors["keep_s"] = (kept[0].double() - ref_s[:-1]).abs().max().item() / scale if slots > 1 else 0.0
        errors["keep_z"] = (kept[1].double() - ref_z[:-1]).abs().max().item() / scale if slots > 1 else 0.0
    return errors


def _check(case, errors):
    for key, value in errors.items():
        bound = 2 ** -7 if key == "keep_s" and case[2] == "bfloat16" else 1e-6     # one bfloat16 unit
        assert value < bound, (case, key, value)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the compiled kernel (below)")
def test_interpreted_cumsum_matches_torch():
    for case, errors in zip(CASES, compare_interpreted("test_rf_cumsum", timeout=300)):
        _check(case, errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_cuda_cumsum_matches_torch(case):
    _check(case, compare(*case, device="cuda"))
