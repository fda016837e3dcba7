"""Registers and stack (spill space) per thread of the fused random-feature kernels, compiled for a CUDA target
without a GPU: Triton compiles each kernel to a cubin for the chosen architecture and ``cuobjdump -res-usage`` (the
copy shipped with Triton) reads its resource usage.

    python scripts/kernel_resources.py                                  # RFA and Performer, the module's defaults
    python scripts/kernel_resources.py --feat rfa --warps 4 8 --block-m 16 32 --arch 90

A kernel at the register cap (255) with stack bytes spills: its loop reloads values from local memory, which is
what to look at before timing a change on the GPU. The numbers depend on the Triton version (this machine's may
differ from the GPU machine's); timings belong to ``bench_random_features.py``. Signatures: q, k, v, out and their
gradients in bf16 (``--dtype``), everything else fp32, shapes as in ``random_features_fused._Plan.consts``.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from rlformer.attention import random_features_fused as fused_rf  # noqa: E402

try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:                                   # pragma: no cover - needs Triton
    raise SystemExit(f"kernel_resources.py needs Triton ({err}); CPU-only installs do not have it") from err

TENSOR_ARGS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}
FLOAT_ARGS = {"kcoef", "inv_sqrt_m", "floor"}
KERNELS = {"segment_sums": (fused_rf._segment_sums_kernel, {"REVERSE": True}),
           "forward": (fused_rf._forward_kernel, {}),
           "dq": (fused_rf._dq_kernel, {"NEED_DS": True}),
           "dkdv": (fused_rf._dkdv_kernel, {"NEED_DS": True})}


def resources(kernel, consts: dict, arch: int, warps: int, stages: int, dtype: str) -> dict:
    """{"registers", "stack"} per thread and "shared" (dynamic shared memory) per block of ``kernel`` compiled with
    ``consts``."""
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in params:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in TENSOR_ARGS else "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(name),): value for name, value in consts.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    usage = {key: int(re.search(rf"{tag}:(\d+)", text).group(1)) for key, tag in (("registers", "REG"),
                                                                                  ("stack", "STACK"))}
    usage["shared"] = compiled.metadata.shared                  # dynamic shared memory per block (bytes)
    return usage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--feat", nargs="+", default=["rfa", "performer"], choices=["rfa", "performer"])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--warps", type=int, nargs="+", default=[fused_rf.NUM_WARPS])
    p.add_argument("--block-m", type=int, nargs="+", default=[0],
                   help="0: the module default of each kind and kernel (SUMS_BLOCK_M for segment_sums)")
    p.add_argument("--stages", type=int, default=fused_rf.NUM_STAGES)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--chunk", type=int, nargs="+", default=[0],
                   help="tokens per chunk (C); 0: the module default of each kernel (SUMS_CHUNK for segment_sums)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}, d_head {args.d_head}")
    print("| features | kernel | chunk | warps | block_m | registers | stack bytes | shared bytes |\n"
          "|---|---|---|---|---|---|---|---|")
    for feat_name, name, chunk, warps, bm in itertools.product(args.feat, args.kernels, args.chunk, args.warps,
                                                                args.block_m):
        feat = fused_rf.FEAT_TRIG if feat_name == "rfa" else fused_rf.FEAT_EXP
        kernel, extra = KERNELS[name]
        sums = name == "segment_sums"
        default_chunk = fused_rf.SUMS_CHUNK[feat] if sums and fused_rf.SUMS_CHUNK else fused_rf.CHUNK
        default_bm = ((fused_rf.SUMS_BLOCK_M or fused_rf.BLOCK_M) if sums else fused_rf.BLOCK_M)[feat]
        consts = dict(FEAT=feat, HAS_CW=False, C=chunk or default_chunk, D=args.d_head, DV=args.d_head,
                      BM=bm or default_bm, PREC="tf32", FAST=True,
                      DT=tl.bfloat16 if args.dtype == "bf16" else tl.float16, **extra)
        r = resources(kernel, consts, args.arch, warps, args.stages, args.dtype)
        cells = (feat_name, name, consts["C"], warps, consts["BM"], r["registers"], r["stack"], r["shared"])
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
