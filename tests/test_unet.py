"""Unet3D: shapes, focus-present causality, text conditioning and CFG, checkpointing, bf16."""

import ast
import pathlib

import pytest
import torch

from vdm.model import Unet3D

COND_DIM = 16
# lucidrains/video-diffusion-pytorch Unet3D(dim=64, cond_dim=768, dim_mults=(1, 2, 4, 8)) with
# every other argument at its default. It is not installed; the figure was obtained by rebuilding
# its layer shapes from video_diffusion_pytorch.py (commit 01f7f82) and summing them: init conv
# 3->42 7x7; per level two ResnetBlocks (two 3x3 conv+GroupNorm Blocks, Linear(256+768 -> out)
# shift, 1x1 residual conv), SpatialLinearAttention (8 heads x 32), temporal Attention (8 x 32,
# no bias) with LayerNorm gains, 4x4 down/transposed-up convs; mid 2 ResnetBlocks + spatial and
# temporal attention; time MLP 64->256->256; null_cond_emb 768; relative position bias 32x8;
# shared rotary freqs 16; final ResnetBlock(64, 64) + 1x1 conv to 3.
REFERENCE_PARAMS = 37_206_085


def tiny(**kwargs):
    torch.manual_seed(0)
    args = dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, cond_dim=COND_DIM)
    args.update(kwargs)
    return Unet3D(**args).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def inputs(b=2, f=4, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, f, h, w, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    cond = torch.randn(b, 5, COND_DIM, generator=g)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])[:b]
    return x, t, cond, mask


@pytest.mark.parametrize("frames", [1, 5, 8])
@pytest.mark.parametrize("size", [(16, 16), (32, 24)])
@torch.no_grad()
def test_output_shape_equals_input_shape(model, frames, size):
    x, t, cond, mask = inputs(f=frames, h=size[0], w=size[1])
    assert model(x, t, cond, mask).shape == x.shape


@torch.no_grad()
def test_out_dim_and_unconditional_model():
    m = tiny(cond_dim=None, out_dim=6, use_sparse_linear_attn=False)
    x, t, _, _ = inputs()
    assert m(x, t).shape == (2, 6, 4, 16, 16)
    assert not m.has_cond and m.downsample_factor == 2
    with pytest.raises(ValueError, match="without cond_dim"):
        m(x, t, cond=torch.randn(2, COND_DIM))


@torch.no_grad()
def test_focus_present_makes_frames_independent(model):
    x, t, cond, mask = inputs(f=5)
    x2 = x.clone()
    x2[:, :, 2] += torch.randn_like(x2[:, :, 2])
    others = [0, 1, 3, 4]
    focus = torch.ones(2, dtype=torch.bool)
    a = model(x, t, cond, mask, focus_present_mask=focus)
    b = model(x2, t, cond, mask, focus_present_mask=focus)
    torch.testing.assert_close(a[:, :, others], b[:, :, others], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])

    focus = torch.tensor([True, False])  # mixed batch: only sample 1 mixes frames
    a = model(x, t, cond, mask, focus_present_mask=focus)
    b = model(x2, t, cond, mask, focus_present_mask=focus)
    torch.testing.assert_close(a[0, :, others], b[0, :, others], atol=1e-6, rtol=0)
    assert (a[1, :, others] - b[1, :, others]).abs().amax() > 1e-4

    a = model(x, t, cond, mask, prob_focus_present=1.0)
    b = model(x2, t, cond, mask, prob_focus_present=1.0)
    torch.testing.assert_close(a[:, :, others], b[:, :, others], atol=1e-6, rtol=0)


@torch.no_grad()
def test_text_conditioning_and_guidance(model):
    x, t, cond, mask = inputs()
    out = model(x, t, cond, mask)
    assert (out - model(x, t, torch.randn_like(cond), mask)).abs().amax() > 1e-4
    null = model(x, t, cond, mask, null_cond_prob=1.0)
    assert (out - null).abs().amax() > 1e-4
    torch.testing.assert_close(null, model(x, t, None), atol=1e-5, rtol=1e-5)

    torch.testing.assert_close(model.forward_with_cond_scale(x, t, cond, mask, cond_scale=1.),
                               out, atol=0, rtol=0)
    guided = model.forward_with_cond_scale(x, t, cond, mask, cond_scale=3.)
    torch.testing.assert_close(guided, null + (out - null) * 3., atol=1e-4, rtol=1e-4)

    expected = null + (out - null) * 3.
    dims = (1, 2, 3, 4)
    expected_rescaled = expected * (out.std(dim=dims, keepdim=True) /
                                    expected.std(dim=dims, keepdim=True))
    rescaled = model.forward_with_cond_scale(x, t, cond, mask, cond_scale=3., rescaled_phi=0.7)
    torch.testing.assert_close(rescaled, 0.7 * expected_rescaled + 0.3 * expected,
                               atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_padding_tokens_do_not_affect_output(model):
    x, t, cond, mask = inputs()
    cond2 = cond.clone()
    cond2[0, 3:] = torch.randn(2, COND_DIM) * 100
    torch.testing.assert_close(model(x, t, cond, mask), model(x, t, cond2, mask),
                               atol=1e-6, rtol=0)
    # The same values as real tokens do change sample 0.
    full = torch.ones_like(mask)
    assert (model(x, t, cond, full)[0] - model(x, t, cond2, full)[0]).abs().amax() > 1e-4


@torch.no_grad()
def test_max_text_len_pads_and_rejects_longer():
    m = tiny(max_text_len=6)
    x, t, cond, mask = inputs()
    assert m(x, t, cond, mask).shape == x.shape
    assert m.forward_with_cond_scale(x, t, cond, mask, cond_scale=2.).shape == x.shape
    with pytest.raises(ValueError, match="max_text_len=6"):
        m(x, t, torch.randn(2, 7, COND_DIM))


@torch.no_grad()
def test_pooled_vector_cond(model):
    x, t, _, _ = inputs()
    vec = torch.randn(2, COND_DIM)
    out = model(x, t, vec)
    assert out.shape == x.shape
    torch.testing.assert_close(out, model(x, t, vec[:, None]), atol=1e-6, rtol=0)
    assert (out - model(x, t, torch.randn_like(vec))).abs().amax() > 1e-4
    assert model.forward_with_cond_scale(x, t, vec, cond_scale=2.).shape == x.shape


def test_bad_inputs_raise_clear_errors():
    m = tiny(dim_mults=(1, 2, 4))
    with pytest.raises(ValueError, match=r"divisible by the total downsampling factor 4.*18x16"):
        m(torch.randn(1, 3, 2, 18, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="channels=3"):
        m(torch.randn(1, 4, 2, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=f"cond must be .*{COND_DIM}"):
        m(torch.randn(1, 3, 2, 16, 16), torch.tensor([1]), torch.randn(1, 4, COND_DIM + 1))
    with pytest.raises(ValueError, match=r"focus_present_mask must be \(1,\)"):
        m(torch.randn(1, 3, 2, 16, 16), torch.tensor([1]), focus_present_mask=torch.ones(2).bool())
    with pytest.raises(ValueError, match="one flag per level"):
        tiny(layer_cross_attns=(True,))


def _grads_and_saved_bytes(model, x, t, cond, mask):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        focus = torch.tensor([False, True])
        loss = model(x, t, cond, mask, focus_present_mask=focus).square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_gradient_checkpointing_same_grads_fewer_saved_bytes():
    m = tiny().train()
    x, t, cond, mask = inputs(f=4, h=32, w=32)
    grads, plain_bytes = _grads_and_saved_bytes(m, x, t, cond, mask)
    m.gradient_checkpointing = True
    ckpt_grads, ckpt_bytes = _grads_and_saved_bytes(m, x, t, cond, mask)
    for name, g in grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_cpu_attention_path_equals_sdpa():
    """The explicit CPU path of attend gives SDPA's outputs and gradients, bias gradient included."""
    from vdm.model.attention import RelativePositionBias, attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 4, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    rpb = RelativePositionBias(heads=4)
    grads = []
    for explicit in (True, False):
        rpb.zero_grad()
        out = attend(q, k, v, rpb(5, q.device), explicit=explicit)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), *(t.grad.clone() for t in (q, k, v)),
                      rpb.relative_attention_bias.weight.grad.clone()))
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][-1].abs().sum() > 0, "the learned bias gets a gradient"
    # bf16 (softmax in the input dtype, fp32 accumulation in its kernel) stays close to fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attend(q, k, v, rpb(5, q.device))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), grads[0][0], rtol=0.05, atol=0.05)
    # A boolean padding mask (cross-attention): the same outputs and gradients, and masked keys
    # get no gradient at all.
    mask = torch.tensor([True, True, False, True, False]).view(1, 1, 1, 5)
    results = []
    for explicit in (True, False):
        out = attend(q, k, v, mask, explicit=explicit)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), *(t.grad.clone() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][2][..., [2, 4], :].abs().sum() == 0 and results[0][3][..., [2, 4], :].abs().sum() == 0


def test_attention_layouts_match_plain_formulas():
    """The layout-optimised temporal, linear and spatial attentions equal the formulas written out
    plainly (the spatial one with SDPA), in outputs and in the gradients of input and weights."""
    from einops import rearrange

    from vdm.model.attention import (RelativePositionBias, SpatialAttention,
                                     SpatialLinearAttention, TemporalAttention)

    torch.manual_seed(0)
    frames, heads, d = 3, 2, 4
    x = torch.randn(2 * frames, 6, 5, 4, requires_grad=True)  # (b f) c h w
    upstream = torch.randn(2 * frames, 6, 5, 4)

    def assert_same(mod, got, want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        wrt = (x, mod.gamma, mod.to_qkv.weight, mod.to_out.weight)
        for g_got, g_want in zip(torch.autograd.grad(got, wrt, upstream), torch.autograd.grad(want, wrt, upstream)):
            torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)

    def normed_qkv(mod, pos=None):
        t = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), mod.gamma, None, 1e-5)
        if pos is not None:  # (f, c), added to every position of each frame
            t = t + pos.repeat(t.shape[0] // pos.shape[0], 1)[:, None, None, :]
        return (rearrange(u, "n h w (m e) -> n h w m e", m=heads) for u in mod.to_qkv(t).chunk(3, -1))

    temporal, rpb = TemporalAttention(6, heads, d), RelativePositionBias(heads)
    bias = rpb(frames, x.device)
    # The frame's absolute position: sines then cosines of f / 10000^(i / (c/2 - 1)), i < c/2.
    angle = torch.arange(frames)[:, None] / 10000 ** (torch.arange(3) / 2)
    pos = torch.cat((angle.sin(), angle.cos()), dim=-1)
    q, k, v = (rearrange(u, "(b f) h w m e -> b h w m f e", f=frames) for u in normed_qkv(temporal, pos))
    attn = (torch.einsum("bhwmie,bhwmje->bhwmij", q, k) * d ** -0.5 + bias).softmax(-1)
    out = rearrange(torch.einsum("bhwmij,bhwmje->bhwmie", attn, v), "b h w m f e -> (b f) h w (m e)")
    want = x + temporal.to_out(out).permute(0, 3, 1, 2)
    assert_same(temporal, temporal(x, frames, bias), want)

    linear = SpatialLinearAttention(6, heads, d)
    q, k, v = normed_qkv(linear)
    q, k = q.softmax(-1) * d ** -0.5, k.flatten(1, 2).softmax(1).view_as(k)
    context = torch.einsum("nhwmd,nhwme->nmde", k, v)
    out = rearrange(torch.einsum("nmde,nhwmd->nhwme", context, q), "n h w m e -> n h w (m e)")
    want = x + linear.to_out(out).permute(0, 3, 1, 2)
    assert_same(linear, linear(x), want)

    spatial = SpatialAttention(6, heads, d)  # on CPU through attend's explicit path
    q, k, v = (rearrange(u, "n h w m e -> n m (h w) e") for u in normed_qkv(spatial))
    out = rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v),
                    "n m (h w) e -> n h w (m e)", h=5)
    want = x + spatial.to_out(out).permute(0, 3, 1, 2)
    assert_same(spatial, spatial(x), want)


def test_bf16_autocast_forward_backward_finite():
    m = tiny().train()
    x, t, cond, mask = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, cond, mask, null_cond_prob=0.5, prob_focus_present=0.5)
        loss = (out.float() - x).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.null_text_tokens.grad is not None or m.text_to_context[1].weight.grad is not None


def test_parameter_count_close_to_reference():
    with torch.device("meta"):
        m = Unet3D(dim=64, dim_mults=(1, 2, 4, 8), cond_dim=768)
    ours = sum(p.numel() for p in m.parameters())
    print(f"Unet3D params: ours {ours:,}, reference {REFERENCE_PARAMS:,}")
    assert abs(ours - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.10


def test_model_imports_only_torch_einops_stdlib():
    import sys
    allowed = {"torch", "einops", "vdm"} | set(sys.stdlib_module_names)
    for path in pathlib.Path("vdm/model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path} imports {name}"
                if name.startswith("vdm"):
                    assert name.startswith("vdm.model"), f"{path} imports {name}"


@torch.no_grad()
def test_reference_readme_text_example_shapes():
    # The reference README's text example: Unet3D(dim=64, cond_dim=64, dim_mults=(1, 2, 4, 8)),
    # videos (2, 3, 5, 32, 32), text (2, 64); sampling calls forward_with_cond_scale.
    torch.manual_seed(0)
    model = Unet3D(dim=64, cond_dim=64, dim_mults=(1, 2, 4, 8)).eval()
    videos, text = torch.randn(2, 3, 5, 32, 32), torch.randn(2, 64)
    out = model.forward_with_cond_scale(videos, torch.tensor([10, 500]), cond=text, cond_scale=2.)
    assert out.shape == videos.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_guidance_runs_through_module_hooks(model):
    # ZeRO 3 gathers a module's own parameters (here the learned null) in forward hooks, which
    # only fire through __call__; forward_with_cond_scale must not call .forward directly.
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        x, t, cond, mask = inputs(f=2)
        model.forward_with_cond_scale(x, t, cond, mask, cond_scale=2.)
        model.forward_with_cond_scale(x, t, cond, mask, cond_scale=1.)
    finally:
        handle.remove()
    assert len(calls) == 2


@pytest.mark.parametrize("features", [dict(frame_cond=True, temporal_pos=False),
                                      dict(frame_cond=False, temporal_pos=True)])
def test_frames_know_their_place_in_time(features):
    """A clip of one repeated frame: per-frame layers and relative-position attention alone give every
    frame the same output, so such a model cannot start "moving left" on the right from noise; the
    frame-position features make frames differ, and with frame_cond the difference depends on the text."""
    x, t, cond, mask = inputs(f=1)
    still = x.expand(-1, -1, 6, -1, -1)

    def spread(model, cond):  # each frame's output minus the mean over frames
        with torch.no_grad():
            out = model(still, t, cond, mask)
        return out - out.mean(dim=2, keepdim=True)

    plain = tiny(frame_cond=False, temporal_pos=False)
    assert spread(plain, cond).abs().max() < 1e-5
    model = tiny(**features)
    if features["frame_cond"]:
        torch.nn.init.normal_(model.frame_cond[-1].weight, std=0.1)  # zero at init, as a fresh run has it
    a = spread(model, cond)
    assert a.abs().max() > 1e-2
    if features["frame_cond"]:
        b = spread(model, cond.flip(0))
        assert (a - b).abs().max() > 1e-3, "the per-frame code depends on the caption"


def test_temporal_conv_is_identity_at_init_and_mixes_neighbouring_frames():
    """Zero-initialised, it leaves a fresh model's function alone; its kernel reads the frames before
    and after at each position (here: frame f gets frame f-1 added), and nothing farther."""
    from vdm.model.layers import TemporalConv

    torch.manual_seed(0)
    frames, x = 5, torch.randn(2 * 5, 4, 3, 3)  # (b f) c h w
    conv = TemporalConv(4)
    torch.testing.assert_close(conv(x, frames), x)
    with torch.no_grad():
        conv.conv.weight[:, :, 0] = torch.eye(4)  # tap 0 of a centred kernel of 3 = the previous frame
    got = conv(x, frames).view(2, frames, 4, 3, 3)
    v = x.view(2, frames, 4, 3, 3)
    torch.testing.assert_close(got[:, 1:], v[:, 1:] + v[:, :-1])
    torch.testing.assert_close(got[:, 0], v[:, 0])  # zero padding: nothing before the first frame
