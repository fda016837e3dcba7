"""bf16 accuracy of lsh's fused backward vs flex (causal, T=3000): A = as committed; B = delta from an fp32 o."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, "tests")
from test_bucket_fused import padding
from rlformer.attention import bucket_fused, flex_bucket
from rlformer.attention.chunked_softmax import bucket_softmax_attention
b, h, t, dh, nb, C = 2, 8, 3000, 64, 16, 64
g = torch.Generator().manual_seed(3)
q, v, probe = (torch.randn(b, t, h, dh, generator=g).transpose(1, 2).to("cuda", torch.bfloat16) for _ in range(3))
buckets = torch.randint(0, nb, (b, h, 2, t), generator=g).cuda()
valid = padding(b, t)
kw = dict(causal=True, self_penalty=True, key_valid=valid.cuda(), dedup=True)
q64, v64 = (x.double().cpu().requires_grad_() for x in (q, v))
ref = bucket_softmax_attention(q64, F.normalize(q64, dim=-1), v64, buckets.cpu(), nb, C, 0.125, **{**kw, "key_valid": valid})
(ref * probe.double().cpu()).sum().backward()
refs = (ref.detach(), q64.grad, v64.grad)
def err(fn):
    qq, vv = (x.detach().clone().requires_grad_() for x in (q, v))
    out = fn(qq, vv)
    (out.float() * probe.float()).sum().backward()
    res = {}
    for name, a, r in zip(("out", "dq", "dv"), (out, qq.grad, vv.grad), refs):
        e = (a.double().cpu() - r).abs()
        res[name] = round((e.max() / r.abs().max()).item(), 5)
        if name == "dq":
            et = e.amax(dim=(0, 1, 3))
            res["dq_worst_t"] = et.topk(5).indices.tolist()
    return res
print("flex", err(lambda a, c: flex_bucket.flex_bucket_attention(a, None, c, buckets, nb, C, 0.125, **kw)))
print("A fused", err(lambda a, c: bucket_fused.shared_qk_bucket_attention(a, c, buckets, C, 0.125, **kw)))
o32 = bucket_fused.shared_qk_bucket_attention(q.float(), v.float(), buckets, C, 0.125, **kw)
real = bucket_fused._delta_kernel
class Swap:
    def __getitem__(self, grid):
        return lambda grad, o, *a, **k: real[grid](grad, o32, *a, **k)
bucket_fused._delta_kernel = Swap()
print("B fused, delta from fp32 o", err(lambda a, c: bucket_fused.shared_qk_bucket_attention(a, c, buckets, C, 0.125, **kw)))
bucket_fused._delta_kernel = real
class FP32Accum:
    def __getattr__(self, name):
        return getattr(torch, name)
    @staticmethod
    def empty_like(x, **k):
        return torch.empty_like(x, dtype=torch.float32)
bucket_fused.torch = FP32Accum()
print("C fused, fp32 dq/dv across rounds", err(lambda a, c: bucket_fused.shared_qk_bucket_attention(a, c, buckets, C, 0.125, **kw)))
bucket_fused._delta_kernel = Swap()
print("D fused, fp32 accumulation + delta from fp32 o", err(lambda a, c: bucket_fused.shared_qk_bucket_attention(a, c, buckets, C, 0.125, **kw)))
bucket_fused._delta_kernel = real
bucket_fused.torch = torch
print("ref dq max", refs[1].abs().max().item())
