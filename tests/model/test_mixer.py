"""KLAMixer against an independent float64 token-by-token implementation of docs/design.md section 1.

One process, a gloo world of size 1 with megatron's parallel state at TP = 1. Shapes are the `tiny`
named model (4 heads, K = 24, V = 48); 70 tokens cross the 64-token chunk of the kernels.
"""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import build_module

from kla_megatron.config import named_model, transformer_config
from kla_megatron.mixer_math import MixerShape, mix
from kla_megatron.mixer import KLAMixer, KLAMixerSubmodules
from kla_megatron.specs import mixer_spec
from kla_model_testing import megatron_world, mixer_params, reference_mixer, rel_err

TOL = 1e-4
SEQ = 70


@pytest.fixture(scope="module", autouse=True)
def world():
    with megatron_world(tensor_parallel=1):
        yield


def make_mixer(mixer="kla", norm_eps=None, seed=0, layer_number=1):
    """A mixer of the tiny model through the project's spec; norm weights randomised so that a
    mix-up of heads or channels in the per-head norm shows."""
    model = named_model("tiny")
    if norm_eps is not None:
        model = replace(model, norm_eps=norm_eps)
    config = transformer_config(model, use_cpu_initialization=True)
    torch.manual_seed(seed)
    module = build_module(mixer_spec(mixer, model), config=config, layer_number=layer_number)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        module.norm_weight.copy_(1 + 0.5 * torch.randn(module.norm_weight.shape, generator=gen))
    return module, model, config


def reference(module, config, x, cu_seqlens=None, params=None):
    return reference_mixer(
        x,
        params if params is not None else mixer_params(module),
        heads=module.num_heads,
        key_dim=module.key_dim,
        value_dim=module.value_dim,
        beta_mode=module.shape.beta_mode,
        eps=module.shape.eps,
        norm_eps=config.layernorm_epsilon,
        cu_seqlens=cu_seqlens,
    )


def inputs(seq, batch, hidden, seed=1):
    return torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(seed))


def packed(cu):
    return PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(cu.diff().max()),
                           max_seqlen_kv=int(cu.diff().max()), qkv_format="thd")


# norm_eps = 1e-2 makes the magnitude of o (the K^-0.5 scale, ||q|| normalisation) visible through
# the per-head RMSNorm, which otherwise removes any per-(token, head) factor.
@pytest.mark.parametrize("norm_eps", [None, 1e-2], ids=["default-norm-eps", "norm-eps-1e-2"])
@pytest.mark.parametrize("mixer", ["kla", "gdn"])
def test_mixer_matches_reference(mixer, norm_eps):
    module, model, config = make_mixer(mixer, norm_eps)
    assert module.shape.beta_mode == {"kla": "kaczmarz", "gdn": "sigmoid"}[mixer]
    assert module.shape.eps == model.kla_eps
    x = inputs(SEQ, 2, model.hidden_size)
    with torch.no_grad():
        out, bias = module(x)
    assert bias is None
    assert out.shape == x.shape and out.dtype == torch.float32
    err = rel_err(out, reference(module, config, x))
    assert err < TOL, f"{mixer}: rel err {err:.2e}"


def test_kla_and_gdn_differ_only_by_the_switch():
    kla, model, config = make_mixer("kla", seed=3)
    gdn, _, _ = make_mixer("gdn", seed=3)
    kla_params = {n: p for n, p in kla.named_parameters()}
    gdn_params = {n: p for n, p in gdn.named_parameters()}
    assert list(kla_params) == list(gdn_params)
    for name in kla_params:
        assert kla_params[name].shape == gdn_params[name].shape, name
        # same seed, same init: the mode changes nothing about the parameters
        torch.testing.assert_close(kla_params[name], gdn_params[name], rtol=0, atol=0, msg=name)
    assert type(kla) is type(gdn) is KLAMixer
    x = inputs(SEQ, 2, model.hidden_size, seed=4)
    with torch.no_grad():
        y_kla, _ = kla(x)
        y_gdn, _ = gdn(x)
    assert rel_err(y_kla, y_gdn) > 1e-2, "KLA and GDN outputs agree: the beta_mode switch has no effect"
    # each one matches its own reference, and not the other's
    assert rel_err(y_gdn, reference(gdn, config, x)) < TOL
    assert rel_err(y_gdn, reference(kla, config, x)) > 1e-2


@pytest.mark.parametrize("key_scale", [1e-2, 1e2, 1e3])
def test_kla_any_key_scale(key_scale):
    """Scaling the k rows of in_proj scales the raw keys (norms ~1e-3 to ~1e2 here): KLA must stay
    finite and match the reference, eps of beta = eta / (||k||^2 + eps) included."""
    module, model, config = make_mixer("kla", seed=5)
    H, K = module.local_heads, module.key_dim
    with torch.no_grad():
        module.in_proj.weight[H * K : 2 * H * K] *= key_scale
    x = inputs(SEQ, 2, model.hidden_size, seed=6)
    with torch.no_grad():
        out, _ = module(x)
    assert torch.isfinite(out).all()
    err = rel_err(out, reference(module, config, x))
    assert err < TOL, f"key scale {key_scale}: rel err {err:.2e}"


@pytest.mark.parametrize("mixer", ["kla", "gdn"])
def test_mixer_gradients(mixer):
    module, model, config = make_mixer(mixer, seed=7)
    x = inputs(SEQ, 1, model.hidden_size, seed=8).requires_grad_(True)
    out, _ = module(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (out.double() * cotangent).sum().backward()

    leaves = {name: p.detach().double().requires_grad_(True) for name, p in mixer_params(module).items()}
    x64 = x.detach().double().requires_grad_(True)
    ref = reference(module, config, x64, params=leaves)
    (ref * cotangent).sum().backward()

    got = {name: p.grad for name, p in mixer_params(module).items()}
    got["x"], leaves["x"] = x.grad, x64
    for name, leaf in leaves.items():
        assert got[name] is not None, f"no gradient for {name}"
        err = rel_err(got[name], leaf.grad)
        assert err < TOL, f"{mixer}: grad of {name} rel err {err:.2e}"


def test_projection_gradient_arrives_in_megatrons_layout():
    """The gradient that reaches in_proj's backward is [s, b, width] contiguous, which megatron's linear layer
    takes without copying (torch.split's backward would give a transposed view of a [b, s, width] tensor). Its
    values are test_mixer_gradients' business."""
    module, model, _ = make_mixer("kla", seed=3)
    seen = []

    def watch(_module, _args, output):
        output[0].register_hook(seen.append)

    module.in_proj.register_forward_hook(watch)
    out, _ = module(inputs(SEQ, 3, model.hidden_size, seed=4))
    out.sum().backward()
    assert seen[0].shape == (SEQ, 3, sum(module.in_proj_split)) and seen[0].is_contiguous()


def test_conv_and_gated_norm_write_the_projection_gradient_in_place():
    """On the Triton backend (the interpreter here) the backward of the conv and of the gated norm write the gradients
    of q, k, v and of the gate z straight into the projection's gradient: ColumnSplit's backward copies in only the
    gates' b and a. The gradient equals the torch backend's, which ColumnSplit assembles by copying all four."""
    shape = MixerShape(heads=2, key_dim=8, value_dim=16)
    T, B = 70, 2
    gen = torch.Generator().manual_seed(0)
    projection = torch.randn(T, B, sum(shape.projection_split), generator=gen).requires_grad_(True)
    weights = [torch.randn(shape.conv_channels, 4, generator=gen) / 2, torch.rand(2, generator=gen).log(),
               torch.randn(2, generator=gen), 1 + 0.1 * torch.randn(2, 16, generator=gen)]
    cotangent = torch.randn(T, B, 2 * 16, generator=gen)
    gradients, copies = {}, {}
    for backend in ("torch", "triton"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            y, _ = mix(projection.transpose(0, 1), *weights, shape, time_major_output=True, backend=backend)
            (gradients[backend],) = torch.autograd.grad((y * cotangent).sum(), [projection])
        copies[backend] = [e for e in profile.events() if e.name == "aten::copy_" and e.cpu_parent is not None
                           and "ColumnSplitBackward" in e.cpu_parent.name]
    assert (len(copies["torch"]), len(copies["triton"])) == (4, 2)
    assert gradients["triton"].is_contiguous() and rel_err(gradients["triton"], gradients["torch"]) < TOL


def test_bf16_mixer():
    """Training precision: bf16 parameters and activations, fp32 inside (gates, state, norm)."""
    model = named_model("tiny")
    config = transformer_config(model, params_dtype=torch.bfloat16, use_cpu_initialization=True)
    torch.manual_seed(0)
    module = build_module(mixer_spec("kla", model), config=config, layer_number=1)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    x = inputs(SEQ, 2, model.hidden_size).bfloat16().requires_grad_(True)
    out, _ = module(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name
    err = rel_err(out, reference(module, config, x.detach()))
    assert err < 3e-2, f"bf16 rel err {err:.2e}"


def test_packed_documents_restart_conv_and_state():
    """B = 1 with cu_seqlens: every document must come out as if run alone, documents shorter than
    the conv kernel and one longer than a chunk included; forward and gradients."""
    module, model, config = make_mixer("kla", seed=10)
    cu = torch.tensor([0, 2, 5, 71, 80], dtype=torch.int32)
    x = inputs(int(cu[-1]), 1, model.hidden_size, seed=11).requires_grad_(True)
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))

    out, _ = module(x, packed_seq_params=packed(cu))
    (out * cotangent).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    packed_x_grad = x.grad.clone()
    module.zero_grad()

    bounds = cu.tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        part = x.detach()[lo:hi].clone().requires_grad_(True)
        alone, _ = module(part)
        (alone * cotangent[lo:hi]).sum().backward()
        err = rel_err(out[lo:hi], alone)
        assert err < TOL, f"document [{lo}, {hi}): packed vs alone rel err {err:.2e}"
        err = rel_err(packed_x_grad[lo:hi], part.grad)
        assert err < TOL, f"document [{lo}, {hi}): input grad rel err {err:.2e}"
    for name, p in module.named_parameters():
        err = rel_err(packed_grads[name], p.grad)
        assert err < TOL, f"grad of {name}: packed vs documents alone rel err {err:.2e}"

    # and the float64 reference agrees; without cu_seqlens the later documents do change
    assert rel_err(out, reference(module, config, x.detach(), cu_seqlens=cu)) < TOL
    with torch.no_grad():
        unpacked, _ = module(x)
    assert rel_err(unpacked[2:], out[2:]) > 1e-3


def test_built_directly_with_megatron_linears():
    """KLAMixer built by hand (no spec) is the same module as the spec's."""
    model = named_model("tiny")
    config = transformer_config(model, use_cpu_initialization=True)
    torch.manual_seed(0)
    module = KLAMixer(config, KLAMixerSubmodules(ColumnParallelLinear, RowParallelLinear), beta_mode="kaczmarz")
    assert isinstance(module.in_proj, ColumnParallelLinear) and isinstance(module.out_proj, RowParallelLinear)
    H, K, V = model.num_heads, model.key_head_dim, model.value_head_dim
    assert module.in_proj.weight.shape == (H * (2 * K + 2 * V + 2), model.hidden_size)
    assert module.out_proj.weight.shape == (model.hidden_size, H * V)
    assert module.conv_weight.shape == (H * (2 * K + V), model.conv_kernel)
    assert module.norm_weight.shape == (H, V)
    # GDN-paper init: A in [1, 16], dt = softplus(dt_bias) in [1e-3, 0.1]
    A = module.A_log.exp()
    dt = torch.nn.functional.softplus(module.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    for p in (module.A_log, module.dt_bias, module.norm_weight):
        assert getattr(p, "no_weight_decay", False)
    x = inputs(9, 2, model.hidden_size)
    with torch.no_grad():
        out, _ = module(x)
    assert rel_err(out, reference(module, config, x)) < TOL


class _FakeGroup:
    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_tensor_parallel_must_divide_heads():
    model = named_model("tiny")  # 4 heads
    config = transformer_config(model, use_cpu_initialization=True)
    with pytest.raises(ValueError, match=r"4 heads.*tensor_parallel=3"):
        KLAMixer(
            config,
            KLAMixerSubmodules(ColumnParallelLinear, RowParallelLinear),
            pg_collection=SimpleNamespace(tp=_FakeGroup(3), cp=_FakeGroup(1)),
        )
    with pytest.raises(ValueError, match="beta_mode"):
        KLAMixer(config, KLAMixerSubmodules(ColumnParallelLinear, RowParallelLinear), beta_mode="softmax")
