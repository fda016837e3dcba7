"""rlformer.attention.projection: ``linear`` is F.linear with the bias gradient as a matrix-vector product."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlformer.attention.projection import Projection, linear

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_outputs_and_gradients(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 6, dtype=torch.float64)
    inputs = (x, w) + ((b,) if bias else ())
    ours = linear(x, w, b)
    grads = torch.autograd.grad(ours, inputs, g)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    torch.testing.assert_close(ours, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_linear_double_backward_and_weight_views():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: linear(x, w[2:6], b[2:6]), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: linear(x, w, b), (x, w, b))
    # the weight rows a view selects get their gradient, the others zero
    linear(x, w[2:6], b[2:6]).sum().backward()
    assert w.grad[:2].abs().sum() == 0 and w.grad[6:].abs().sum() == 0 and w.grad[2:6].abs().sum() > 0
    assert b.grad[:2].abs().sum() == 0 and torch.allclose(b.grad[2:6], torch.full((4,), 12.0, dtype=torch.float64))


def test_projection_under_autocast_matches_nn_linear():
    torch.manual_seed(2)
    ours, ref = Projection(5, 6), nn.Linear(5, 6)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 3, 5)
    outs = []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
    for a, r in zip(*outs):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
    assert outs[0][0].dtype == torch.bfloat16 and outs[0][2].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: bf16 GEMV bias gradient on the GPU")
def test_cuda_bias_gradient_of_a_tall_half_matrix():
    torch.manual_seed(3)
    x = torch.randn(1, 16384, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer = Projection(512, 512).to("cuda", torch.bfloat16)
    g = torch.randn(1, 16384, 512, device="cuda", dtype=torch.bfloat16)
    layer(x).backward(g)
    want = g.double().sum((0, 1))
    torch.testing.assert_close(layer.bias.grad.double(), want, rtol=1e-2, atol=0.5)
    torch.testing.assert_close(layer.weight.grad.double(), g.double()[0].t() @ x.double()[0], rtol=2e-2, atol=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: torch.compile + bf16 autocast as DT trains")
def test_cuda_compiled_encoder_under_autocast_matches_eager():
    import rlformer

    cfg = rlformer.EncoderConfig(d_model=64, n_layers=2, n_heads=4, position="rope", dropout=0.0, max_len=128)
    torch.manual_seed(4)
    enc = rlformer.build_encoder(cfg).cuda()
    x = torch.randn(3, 32, 64, device="cuda")
    results = []
    for model in (enc, torch.compile(enc)):
        enc.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x).output
        out.float().square().mean().backward()
        results.append((out.float(), [p.grad.clone() for p in enc.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
