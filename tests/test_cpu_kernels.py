"""The fused CPU kernels (temporal attention; the linear attention's softmaxes; GroupNorm +
scale-shift + SiLU; the transpose behind the projections' weight gradients) and the Upsample's
backward against the formula or the PyTorch ops, alone and inside the model."""

import pytest
import torch
from einops import rearrange

from vdm.model import Unet3D, cpu_kernels
from vdm.model.attention import RelativePositionBias, SpatialLinearAttention, TemporalAttention
from vdm.model.layers import Conv3x3, GroupNormSiLU, Linear, Upsample


def reference(qkv, bias, frames, heads):
    """softmax(q k^T / sqrt(d) + bias) v per position and head, written out in fp64."""
    q, k, v = rearrange(qkv.double(), "(b f) n (k m d) -> k b n m f d", f=frames, k=3, m=heads)
    scores = torch.einsum("bnmid,bnmjd->bnmij", q, k) * q.shape[-1] ** -0.5 + bias.double()
    out = torch.einsum("bnmij,bnmjd->bnmid", scores.softmax(-1), v)
    return rearrange(out, "b n m f d -> (b f) n (m d)")


@pytest.fixture(autouse=True)
def load_kernels():
    # Loads the ops before each test, so a test that calls them directly also runs alone (-k).
    cpu_kernels.available()


def test_kernel_is_built_here():
    # CI machines have a compiler: the tests below must exercise the kernel, not skip it.
    assert cpu_kernels.available()


@pytest.mark.parametrize("frames,dim_head", [(1, 16), (3, 16), (16, 32), (17, 16), (5, 64)])
def test_temporal_kernel_matches_formula_with_gradients(frames, dim_head):
    torch.manual_seed(frames)
    heads, b, n = 2, 2, 6
    qkv = torch.randn(b * frames, n, 3 * heads * dim_head, requires_grad=True)
    bias = torch.randn(heads, frames, frames, requires_grad=True)
    grad = torch.randn(b * frames, n, heads * dim_head)

    out = cpu_kernels.temporal_attention(qkv, bias, frames, heads)
    out.backward(grad)
    got = out, qkv.grad, bias.grad
    qkv.grad = bias.grad = None
    ref = reference(qkv, bias, frames, heads)
    ref.backward(grad.double())
    for g, r in zip(got, (ref, qkv.grad, bias.grad)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r.float(), atol=2e-5, rtol=1e-4)


def test_temporal_kernel_gradcheck_fp64():
    torch.manual_seed(0)
    frames, heads, dim_head = 3, 2, 16
    qkv = torch.randn(frames, 2, 3 * heads * dim_head, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(heads, frames, frames, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, c: cpu_kernels.temporal_attention(a, c, frames, heads), (qkv, bias))


def test_temporal_kernel_bf16_close_to_fp32():
    # bf16 in and out, fp32 inside: within bf16 rounding of the exact result on the same inputs.
    torch.manual_seed(0)
    frames, heads, dim_head = 8, 4, 32
    qkv = torch.randn(2 * frames, 64, 3 * heads * dim_head).bfloat16().requires_grad_()
    bias = torch.randn(heads, frames, frames, requires_grad=True)
    out = cpu_kernels.temporal_attention(qkv, bias, frames, heads)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_bias = bias.detach().double().requires_grad_()
    ref = reference(ref_qkv, ref_bias, frames, heads)
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=6e-2, rtol=2e-2)
    rel = (bias.grad.double() - ref_bias.grad).norm() / ref_bias.grad.norm()
    assert rel < 1e-2


def test_temporal_kernel_rejects_bad_shapes():
    qkv = torch.randn(6, 4, 3 * 2 * 16)
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu_kernels.temporal_attention(qkv, torch.zeros(2, 2, 2), 3, 2)
    with pytest.raises(RuntimeError, match="batch \\* frames"):
        cpu_kernels.temporal_attention(qkv, torch.zeros(2, 4, 4), 4, 2)
    with pytest.raises(RuntimeError, match="dim_head must be"):
        cpu_kernels.temporal_attention(torch.randn(6, 4, 3 * 2 * 8), torch.zeros(2, 3, 3), 3, 2)


def assert_same_without_kernel(monkeypatch, switch, run, dtype):
    """run() (outputs and gradients) on the kernel equals run() with `cpu_kernels.<switch>`
    returning False, i.e. on the module's PyTorch path; bf16 within its rounding."""
    fused = run()
    monkeypatch.setattr(cpu_kernels, switch, lambda *args: False)
    plain = run()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert len(fused) == len(plain)
    for a, c in zip(fused, plain):
        torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temporal_attention_module_same_with_and_without_kernel(monkeypatch, dtype):
    """TemporalAttention on the kernel equals its PyTorch path (outputs and every gradient),
    with some samples focused on the present frame."""
    torch.manual_seed(0)
    frames, b = 5, 3
    attn = TemporalAttention(32, heads=4, dim_head=16)
    pos = RelativePositionBias(heads=4)
    x = torch.randn(b * frames, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    focus = torch.tensor([False, True, False])

    def run():
        attn.zero_grad()
        pos.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = attn(xi, frames, pos(frames, x.device), focus)
        out.float().square().mean().backward()
        params = [p.grad.clone() for p in (*attn.parameters(), *pos.parameters())]
        return [out.float(), xi.grad, *params]

    assert cpu_kernels.use_temporal_kernel(x, attn.dim_head)
    assert_same_without_kernel(monkeypatch, "use_temporal_kernel", run, dtype)


def test_unsupported_dim_head_uses_pytorch_path():
    x = torch.randn(2, 8)
    assert not cpu_kernels.use_temporal_kernel(x, 8)
    assert cpu_kernels.use_temporal_kernel(x, 32)


def linear_attention_reference(qkv, heads):
    """q softmaxed over d, k over the positions, v: each (n, heads, positions, d), in fp64."""
    q, k, v = rearrange(qkv.double(), "n h w (k m d) -> k n m (h w) d", k=3, m=heads)
    return q.softmax(-1), k.softmax(-2), v


@pytest.mark.parametrize("dtype,dim_head", [(torch.float32, 16), (torch.float32, 32),
                                            (torch.float64, 16)])
def test_linear_attention_kernel_matches_formula_with_gradients(dtype, dim_head):
    # 35 positions: more than one of the kernel's 32-position blocks, the last one partial; large
    # logits, so a softmax without its maximum subtracted would overflow.
    torch.manual_seed(dim_head)
    heads = 3
    qkv = (torch.randn(2, 5, 7, 3 * heads * dim_head, dtype=dtype) * 40).requires_grad_()
    qkv.data[0, 4, 6, heads * dim_head:2 * heads * dim_head] += 200  # k's maximum in the last block
    grads = [torch.randn(2, heads, 35, dim_head, dtype=dtype) for _ in range(3)]
    outs = cpu_kernels.linear_attention_softmax(qkv, heads)
    torch.autograd.backward(outs, grads)
    got = [*outs, qkv.grad]
    qkv.grad = None
    refs = linear_attention_reference(qkv, heads)
    torch.autograd.backward(refs, [g.double() for g in grads])
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-4)
    for g, r in zip(got, (*refs, qkv.grad)):
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.double(), r.double(), **tol)


def test_linear_attention_kernel_gradcheck_fp64():
    torch.manual_seed(0)
    qkv = torch.randn(2, 3, 12, 3 * 2 * 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cpu_kernels.linear_attention_softmax(t, 2), (qkv,))


def test_linear_attention_kernel_bf16_close_to_fp64():
    torch.manual_seed(0)
    qkv = (torch.randn(4, 8, 8, 3 * 4 * 32) * 3).bfloat16().requires_grad_()
    outs = cpu_kernels.linear_attention_softmax(qkv, 4)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum((o.float() * (i + 1)).square().sum() for i, o in enumerate(outs)).backward()
    ref_qkv = qkv.detach().double().requires_grad_()
    refs = linear_attention_reference(ref_qkv, 4)
    sum((r * (i + 1)).square().sum() for i, r in enumerate(refs)).backward()
    for o, r in zip((*outs, qkv.grad), (*refs, ref_qkv.grad)):
        assert (o.double() - r).norm() / r.norm() < 5e-3


def test_linear_attention_kernel_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="3 \\* heads \\* d"):
        cpu_kernels.linear_attention_softmax(torch.randn(2, 4, 4, 3 * 2 * 16 + 1), 2)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernels.linear_attention_softmax(torch.randn(2, 4, 4, 3 * 2 * 8), 2)
    assert not cpu_kernels.use_linear_attention_kernel(torch.randn(2, 8), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attention_module_same_with_and_without_kernel(monkeypatch, dtype):
    torch.manual_seed(0)
    attn = SpatialLinearAttention(32, heads=4, dim_head=32)
    x = torch.randn(3, 32, 6, 7).contiguous(memory_format=torch.channels_last)

    def run():
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = attn(xi)
        out.float().square().mean().backward()
        return [out.float(), xi.grad, *(p.grad.clone() for p in attn.parameters())]

    assert cpu_kernels.use_linear_attention_kernel(x, attn.dim_head)
    assert_same_without_kernel(monkeypatch, "use_linear_attention_kernel", run, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_same_as_conv_transpose(dtype, channels_last):
    """Upsample's CPU backward (bias gradient as a sum) equals nn.ConvTranspose2d's, in fp32 and
    under bf16 autocast, in both memory formats; the state dict is the same."""
    torch.manual_seed(0)
    up = Upsample(24)
    ref = torch.nn.ConvTranspose2d(24, 24, 4, stride=2, padding=1)
    ref.load_state_dict(up.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 24, 5, 6).contiguous(memory_format=fmt)
    results = []
    for module in (up, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = module(xi)
        out.float().square().mean().backward()
        results.append([out, xi.grad, module.weight.grad, module.bias.grad])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 16), (64, 48), (37, 42), (131, 5), (5, 131), (1, 7),
                                   (0, 3), (1000, 64)])
def test_transpose_kernel_exact(dtype, shape):
    """Whole 16x16 blocks, the columns past them and the last rows: bit-exact x^T."""
    x = torch.randn(shape).to(dtype)
    got = torch.ops.vdm_cpu.transpose(x)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, x.t().contiguous())


def test_transpose_kernel_rejects_what_it_cannot_move():
    for bad in (torch.randn(4, 4), torch.randn(4, 4, 2).bfloat16(), torch.randn(8, 4).bfloat16().t()):
        with pytest.raises(RuntimeError, match="contiguous 2-D tensor of a 2-byte dtype"):
            torch.ops.vdm_cpu.transpose(bad)


def autocast_grads(modules, x, upstream):
    """Each module's output under bf16 autocast and its gradients for `upstream`: input, bias
    (None without one), weight."""
    results = []
    for module in modules:
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        out.backward(upstream)
        bias = None if module.bias is None else module.bias.grad
        results.append([out, xi.grad, bias, module.weight.grad])
    return results


@pytest.mark.parametrize("dims", [(24, 80), (80, 24), (42, 48)])  # (in, out): both operand orders
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_linear_same_as_nn_linear(monkeypatch, dims, bias, bf16_weights):
    """vdm's Linear under bf16 autocast (fp32 weights as in the bench, bf16 as in the trainer),
    with the transposed weight gradient forced on every size: the output, input gradient and
    bias gradient equal nn.Linear's bit for bit; the weight gradient, whose sum over positions
    runs in another order, is within bf16 rounding of nn.Linear's, and far closer to the fp64 sum
    than bf16's step."""
    monkeypatch.setattr(cpu_kernels, "LINEAR_TRANSPOSED_MIN_ROWS", 1)
    torch.manual_seed(0)
    ours = Linear(*dims, bias=bias)
    ref = torch.nn.Linear(*dims, bias=bias)
    ref.load_state_dict(ours.state_dict())
    if bf16_weights:
        ours, ref = ours.bfloat16(), ref.bfloat16()
    x = torch.randn(3, 50, 7, dims[0])  # 1,050 positions, not a multiple of 16
    upstream = torch.randn(3, 50, 7, dims[1]).bfloat16()
    results = autocast_grads((ours, ref), x, upstream)
    assert results[0][0].grad_fn.name() == "_LinearBackward"  # the kernel's path was taken
    (out, grad_x, grad_b, grad_w), (ref_out, ref_x, ref_b, ref_w) = results
    assert out.dtype == torch.bfloat16 and grad_w.dtype == ref_w.dtype
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_x)
    assert not bias or torch.equal(grad_b, ref_b)
    exact = (upstream.double().reshape(-1, dims[1]).t()
             @ x.bfloat16().double().reshape(-1, dims[0]))
    torch.testing.assert_close(grad_w.double(), exact, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(grad_w, ref_w, rtol=1.6e-2, atol=2e-2)


def test_linear_is_nn_linear_where_the_kernel_does_not_apply():
    x = torch.randn(4, 8)
    assert cpu_kernels.use_linear_kernel(x, torch.bfloat16)
    assert not cpu_kernels.use_linear_kernel(x, torch.float32)  # 4-byte: no transpose kernel
    with torch.no_grad():
        assert not cpu_kernels.use_linear_kernel(x, torch.bfloat16)  # sampling
    lin = Linear(8, 16)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("shape", [(24, 40, 8, 8), (40, 24, 4, 6), (16, 16, 1, 1)])
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_conv3x3_same_as_nn_conv2d(shape, bf16_weights):
    """Conv3x3 on a small level under bf16 autocast (its weight gradient as one matmul over the
    positions) against nn.Conv2d: output, input and bias gradients bit for bit, the weight
    gradient within bf16 rounding of nn.Conv2d's and of the fp64 sum; all in the same memory
    format."""
    c_in, c_out, h, w = shape
    torch.manual_seed(0)
    ours, ref = Conv3x3(c_in, c_out), torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    if bf16_weights:
        ours, ref = ours.bfloat16(), ref.bfloat16()
    x = torch.randn(5, c_in, h, w).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(5, c_out, h, w).bfloat16()
    results = autocast_grads((ours, ref), x, upstream)
    assert results[0][0].grad_fn.name() == "_Conv3x3Backward"  # the kernel's path was taken
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.stride() == b.stride()
    (out, grad_x, grad_b, grad_w), (ref_out, ref_x, ref_b, ref_w) = results
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_x) and torch.equal(grad_b, ref_b)
    exact = torch.ops.aten.convolution_backward(
        upstream.double(), x.bfloat16().double(), ours.weight.double(), None, (1, 1), (1, 1),
        (1, 1), False, (0, 0), 1, (False, True, False))[1]
    torch.testing.assert_close(grad_w.double(), exact, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(grad_w, ref_w, rtol=1.6e-2, atol=2e-2)


def test_conv3x3_is_nn_conv2d_where_the_kernel_does_not_apply():
    small = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    assert cpu_kernels.use_conv3x3_kernel(small, torch.bfloat16)
    assert not cpu_kernels.use_conv3x3_kernel(small, torch.float32)
    assert not cpu_kernels.use_conv3x3_kernel(small.contiguous(), torch.bfloat16)
    large = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    assert not cpu_kernels.use_conv3x3_kernel(large, torch.bfloat16)  # oneDNN is faster there
    conv = Conv3x3(8, 4)
    torch.testing.assert_close(conv(small), torch.nn.functional.conv2d(small, conv.weight,
                                                                        conv.bias, padding=1))


def group_norm_silu_inputs(dtype, n=3, c=24, seed=0):
    """x far from zero mean (the variance must not cancel), channels not a multiple of 16."""
    torch.manual_seed(seed)
    x = (torch.randn(n, c, 5, 7, dtype=dtype) * 2 + 3).contiguous(memory_format=torch.channels_last)
    scale = torch.randn(n, c, 1, 1, dtype=dtype)
    shift = torch.randn(n, c, 1, 1, dtype=dtype)
    return x.requires_grad_(), scale.requires_grad_(), shift.requires_grad_()


@pytest.mark.parametrize("with_scale_shift", [True, False])
def test_group_norm_silu_kernel_matches_pytorch_with_gradients(monkeypatch, with_scale_shift):
    norm = GroupNormSiLU(4, 24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, scale, shift = group_norm_silu_inputs(torch.float32)
    if not with_scale_shift:
        scale = shift = None
    leaves = [t for t in (x, scale, shift, norm.weight, norm.bias) if t is not None]
    weights = torch.randn(x.shape)

    def run():
        for t in leaves:
            t.grad = None
        out = norm(x, scale, shift)
        (out * weights).sum().backward()
        return [out.detach(), *(t.grad.clone() for t in leaves)]

    assert cpu_kernels.use_fused_norm(x)
    fused = run()
    monkeypatch.setattr(cpu_kernels, "use_fused_norm", lambda x: False)
    plain = run()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_group_norm_silu_kernel_gradcheck_fp64():
    x, scale, shift = group_norm_silu_inputs(torch.float64, n=2, c=8)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: cpu_kernels.group_norm_silu(a[0], a[1], a[2], 2, 1e-5, a[3], a[4]),
        (x, weight, bias, scale, shift))


def test_group_norm_silu_kernel_bf16():
    # bf16 in and out, fp32 inside: within bf16 rounding of the fp32 PyTorch ops.
    x, scale, shift = group_norm_silu_inputs(torch.float32, n=4, c=64)
    weight, bias = torch.randn(64), torch.randn(64)
    out = cpu_kernels.group_norm_silu(x.bfloat16(), weight, bias, 8, 1e-5, scale, shift)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.silu(torch.addcmul(
        shift, torch.nn.functional.group_norm(x.bfloat16().float(), 8, weight, bias), scale + 1))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=1e-2)


def test_group_norm_silu_needs_channels_last():
    x = torch.randn(2, 8, 4, 4)
    assert not cpu_kernels.use_fused_norm(x)
    assert cpu_kernels.use_fused_norm(x.contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="channels-last"):
        cpu_kernels.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5)


def test_unet_same_with_and_without_cpu_kernels(monkeypatch):
    """The whole model (every kernel, text, a focused sample): same outputs and gradients."""
    torch.manual_seed(0)
    model = Unet3D(dim=16, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, cond_dim=32)
    x = torch.randn(2, 3, 5, 16, 16)
    t = torch.tensor([3, 500])
    cond = torch.randn(2, 4, 32)
    focus = torch.tensor([False, True])

    def run():
        model.zero_grad()
        out = model(x, t, cond, null_mask=torch.tensor([False, True]), focus_present_mask=focus)
        out.square().mean().backward()
        return [out.detach(), *(p.grad.clone() for p in model.parameters())]

    assert cpu_kernels.available()  # else both runs below take the PyTorch path
    fused = run()
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    plain = run()
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_failed_build_falls_back_to_pytorch(monkeypatch, tmp_path, caplog):
    """No compiler, or a source that does not build: a warning, and the model's PyTorch path."""
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "_CSRC", tmp_path)
    monkeypatch.setattr(cpu_kernels, "_SOURCES", [tmp_path / "broken.cpp"])
    monkeypatch.setattr(cpu_kernels, "_state", {})
    with caplog.at_level("WARNING", logger="vdm.model.cpu_kernels"):
        assert not cpu_kernels.available()
    assert "using the PyTorch path" in caplog.text
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    assert not cpu_kernels.use_fused_norm(x)
    assert not cpu_kernels.use_temporal_kernel(x, 32)
    assert not cpu_kernels.use_linear_attention_kernel(x, 32)
    assert not cpu_kernels.use_linear_kernel(x, torch.bfloat16)
    assert not cpu_kernels.use_conv3x3_kernel(x, torch.bfloat16)
    block = TemporalAttention(16, heads=2, dim_head=16)
    assert block(x, 2).shape == x.shape  # runs on the PyTorch path


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("VDM_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert not cpu_kernels.available()


def test_unet_in_pure_bf16_close_with_and_without_cpu_kernels(monkeypatch):
    """As the trainer runs DeepSpeed's bf16 mode (bf16 weights, under autocast): the kernels, which
    compute in fp32 inside, stay within bf16 rounding of the PyTorch ops."""
    torch.manual_seed(0)
    model = Unet3D(dim=16, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16, cond_dim=32)
    model = model.bfloat16()
    x = torch.randn(2, 3, 4, 16, 16).bfloat16()
    t = torch.tensor([3, 500])
    cond = torch.randn(2, 4, 32).bfloat16()

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, cond)
        out.float().square().mean().backward()
        return out.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    assert cpu_kernels.available()  # else both runs below take the PyTorch path
    out, grads = run()
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    ref_out, ref_grads = run()
    assert out.dtype == ref_out.dtype
    assert (out - ref_out).norm() / ref_out.norm() < 0.03
    assert (grads - ref_grads).norm() / ref_grads.norm() < 0.05
