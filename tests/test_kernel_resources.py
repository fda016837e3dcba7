"""scripts/kernel_resources.py reads a kernel's registers, stack and shared memory from a cubin compiled for sm_90
without a GPU. Skips where Triton does not import (CI)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlformer.attention import random_features_fused as fused_rf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.skipif(fused_rf.triton is None, reason="Triton does not import here")
def test_resources_of_the_segment_sums_kernel_for_sm90():
    import triton.language as tl
    from kernel_resources import resources
    consts = dict(FEAT=fused_rf.FEAT_TRIG, HAS_CW=False, C=64, D=64, DV=64, BM=32, PREC="tf32", FAST=True,
                  DT=tl.bfloat16, REVERSE=False)
    small = resources(fused_rf._segment_sums_kernel, consts, arch=90, warps=8, stages=1, dtype="bf16")
    assert 32 <= small["registers"] <= 255 and small["stack"] >= 0 and small["shared"] > 0
    narrow = resources(fused_rf._segment_sums_kernel, dict(consts, C=16, D=16, DV=16, BM=16), arch=90, warps=8,
                       stages=1, dtype="bf16")
    assert narrow["registers"] < small["registers"]           # smaller tiles: fewer registers per thread
