"""Named models, layer specs and the GPTModel they build: which mixer each layer gets, the switches
that tell KLA from GDN, the errors a wrong configuration must raise, and causality end to end."""

import warnings
from dataclasses import replace

import pytest
import torch
from megatron.core.transformer.attention import SelfAttention

from kla_megatron import KLAMixer, build_model, named_model, padded_vocab_size, transformer_config
from kla_megatron.config import NAMED_MODELS, ModelConfig
from kla_megatron.specs import mixer_spec
from kla_model_testing import megatron_world

VOCAB = 1024  # a multiple of the padding step: no padded rows


@pytest.fixture(scope="module")
def world():
    with megatron_world(tensor_parallel=1):
        yield


def build(model_config, seed=0, **kwargs):
    config = transformer_config(model_config, use_cpu_initialization=True, **kwargs)
    torch.manual_seed(seed)
    return build_model(model_config, config, VOCAB, 64)


def mixers(model):
    return [layer.self_attention for layer in model.decoder.layers]


@pytest.mark.parametrize("name, beta_mode", [("tiny", "kaczmarz"), ("tiny-gdn", "sigmoid")])
def test_named_linear_models_build(world, name, beta_mode):
    model_config = named_model(name)
    model = build(model_config)
    layers = mixers(model)
    assert len(layers) == model_config.num_layers
    for number, mixer in enumerate(layers, start=1):
        assert type(mixer) is KLAMixer
        assert mixer.shape.beta_mode == beta_mode and mixer.shape.eps == model_config.kla_eps
        assert mixer.layer_number == number
        assert (mixer.num_heads, mixer.key_dim, mixer.value_dim) == (
            model_config.num_heads, model_config.key_head_dim, model_config.value_head_dim)
    assert model.position_embedding_type == "none"  # no positional encoding in the paper's models
    assert model.embedding.word_embeddings.weight.shape == (VOCAB, model_config.hidden_size)


def test_kla_and_gdn_models_have_the_same_parameters(world):
    kla, gdn = build(named_model("tiny"), seed=1), build(named_model("tiny-gdn"), seed=1)
    assert [(n, p.shape) for n, p in kla.named_parameters()] == [(n, p.shape) for n, p in gdn.named_parameters()]
    assert mixer_spec("kla", named_model("tiny")).params["beta_mode"] == "kaczmarz"
    assert mixer_spec("gdn", named_model("tiny")).params["beta_mode"] == "sigmoid"
    custom = replace(named_model("tiny"), kla_eps=1e-4, kernel_keep_states=False)
    assert mixer_spec("kla", custom).params["eps"] == 1e-4
    assert mixer_spec("kla", custom).params["keep_states"] is False


def test_hybrid_places_attention_every_nth_layer(world):
    model_config = replace(named_model("tiny"), num_layers=4, attention_every=2)
    assert [model_config.layer_mixer(i) for i in range(1, 5)] == ["kla", "attention", "kla", "attention"]
    model = build(model_config)
    kinds = [type(m) for m in mixers(model)]
    assert kinds == [KLAMixer, SelfAttention, KLAMixer, SelfAttention]
    attention = mixers(model)[1]
    assert attention.config.kv_channels == model_config.attention_head_dim
    assert model.position_embedding_type == "rope"  # attention layers need positions


def test_hybrid_over_gdn_and_transformer(world):
    gdn_hybrid = build(replace(named_model("tiny-gdn"), attention_every=2))
    layers = mixers(gdn_hybrid)
    assert type(layers[0]) is KLAMixer and layers[0].shape.beta_mode == "sigmoid"
    assert type(layers[1]) is SelfAttention
    transformer = build(replace(named_model("tiny"), mixer="attention"))
    assert all(type(m) is SelfAttention for m in mixers(transformer))


def test_paper_shapes():
    """docs/design.md section 1.5: the 0.4B model, its GDN twin, the hybrid and the transformer baseline."""
    kla = named_model("kla-0.4b")
    assert (kla.num_layers, kla.hidden_size, kla.num_heads) == (11, 1536, 12)
    assert (kla.key_head_dim, kla.value_head_dim, kla.ffn_hidden_size) == (96, 192, 6144)
    assert kla.mixer == "kla" and kla.kla_eps == 1e-6 and kla.conv_kernel == 4 and not kla.uses_attention
    assert replace(named_model("gdn-0.4b"), mixer="kla") == kla
    assert named_model("gdn-0.4b").mixer == "gdn"
    hybrid = named_model("hybrid-0.4b")
    assert [hybrid.layer_mixer(i) for i in range(1, 12)].count("attention") == 2  # layers 4 and 8
    assert named_model("transformer-0.4b").mixer == "attention"
    for name, m in NAMED_MODELS.items():
        assert m.key_head_dim * m.num_heads == m.hidden_size * 3 // 4, name
        assert m.value_head_dim == 2 * m.key_head_dim, name


def test_configuration_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        named_model("nope")
    with pytest.raises(ValueError, match="mixer"):
        replace(named_model("tiny"), mixer="mamba")
    with pytest.raises(ValueError, match="attention_every"):
        replace(named_model("tiny"), attention_every=-1)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(num_layers=1, hidden_size=100, num_heads=3, key_head_dim=8, value_head_dim=16,
                    ffn_hidden_size=64, mixer="attention")
    # tensor parallelism that does not divide the heads is refused with a message naming both
    with pytest.raises(ValueError, match=r"\(4\).*\(3\)"):
        transformer_config(named_model("tiny"), tensor_parallel=3, use_cpu_initialization=True)


@pytest.mark.parametrize("name", ["tiny", "tiny-gdn"])
def test_model_is_causal(world, name):
    """Changing token t changes the logits at t and after, never before (conv, state, MLP, norms)."""
    model = build(named_model(name), seed=2)
    gen = torch.Generator().manual_seed(3)
    seq, t = 20, 11
    tokens = torch.randint(0, VOCAB, (1, seq), generator=gen)
    changed = tokens.clone()
    changed[0, t] = (tokens[0, t] + 1) % VOCAB
    positions = torch.arange(seq)[None]
    with torch.no_grad():
        a = model(tokens, positions, None)
        b = model(changed, positions, None)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=1e-6, atol=1e-6, msg="a later token changed earlier logits")
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 0, "a token did not influence every later position"


def test_transformer_config_warns_nothing():
    """Every run builds one; a warning here is printed by every process of every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transformer_config(named_model("tiny"))


def test_padded_vocab_independent_of_tp():
    """docs/design.md section 3.2: checkpoints reshard across TP sizes. The embedding and output layer are
    stored whole, so their padded row count must not change with the TP size. (Seen: a TP = 1
    checkpoint of vocab 100 (128 rows) loaded into a 256-row TP = 2 model without any error,
    the extra rows zero-filled, and the loss of the same tokens moves from 4.87 to 5.55.)"""
    for vocab in (100, 32000, 50257):
        sizes = {padded_vocab_size(vocab, tp) for tp in (1, 2, 4, 8)}
        assert len(sizes) == 1, f"vocab {vocab}: padded rows per TP size {sizes}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["hybrid", "transformer"])
def test_attention_models_forward_on_gpu(world, variant):
    """RoPE and megatron's attention call CUDA directly, so the forward runs on a GPU only."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    base = named_model("tiny")
    model_config = replace(base, attention_every=2) if variant == "hybrid" else replace(base, mixer="attention")
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = transformer_config(model_config)
    model = build_model(model_config, config, VOCAB, 64).cuda()
    assert [type(m) for m in mixers(model)] == (
        [KLAMixer, SelfAttention] if variant == "hybrid" else [SelfAttention, SelfAttention])
    gen = torch.Generator().manual_seed(0)
    seq, t = 32, 17
    tokens = torch.randint(0, VOCAB, (2, seq), generator=gen).cuda()
    changed = tokens.clone()
    changed[:, t] = (tokens[:, t] + 1) % VOCAB
    positions = torch.arange(seq, device="cuda").expand(2, seq)
    with torch.no_grad():
        a = model(tokens, positions, None)
        b = model(changed, positions, None)
        loss = model(tokens, positions, None, labels=tokens)
    assert torch.isfinite(a).all() and torch.isfinite(loss).all() and loss.shape == (2, seq)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=1e-5, atol=1e-5)  # causal mask and RoPE
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 0
