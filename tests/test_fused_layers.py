"""The fused RMSNorm and attention nodes (train.fused_rms_norm, train.fused_attention): the same forward and
gradients as the models' own layers, on tiny models of several architectures, and they step aside where they would
compute something else."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from train import fused_attention
from train.fused_attention import FusedAttention
from train.fused_rms_norm import FusedRMSNorm

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
ARCHITECTURES = {  # GQA 4:2 in each; Qwen2: q/k/v biases; Qwen3: q/k norms; Phi-3: fused qkv; Gemma 2: soft-capping
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 16}),
}


def _model(arch, dtype=torch.float32):
    config_class, model_class, extra = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_class(config_class(**SHAPE, **extra, attn_implementation="eager")).to(dtype)
    for module in model.modules():  # norm weights start at 1 (0 for Gemma): give them values that matter
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.data.normal_(1.0 if arch != "gemma2" else 0.0, 0.2)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 101, (3, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    return ids, mask


def _loss_and_grads(model, autocast):
    ids, mask = _batch()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_training(before, after, tol):
    (loss, grads), (new_loss, new_grads) = before, after
    torch.testing.assert_close(new_loss, loss, rtol=tol, atol=tol)
    assert grads.keys() == new_grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():  # relative to each tensor's largest gradient
        assert (new_grads[name] - grad).abs().max() <= tol * grad.abs().max(), name


# fp32: the same math in another order; bf16 (base in bf16 under autocast, as CPU training runs): the gradients
# of the layers' own bf16 ops are themselves this far from fp32's
# and an fp32 base under bf16 autocast (bf16_base off), where queries and keys come out of the rotary embedding in
# fp32 and values in bf16
CASES = [(torch.float32, False, 1e-5), (torch.bfloat16, True, 5e-2), (torch.float32, True, 5e-2)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("dtype, autocast, tol", CASES)
def test_fused_rms_norm_trains_like_the_models_own(arch, dtype, autocast, tol):
    model = _model(arch, dtype)
    before = _loss_and_grads(model, autocast)
    fused = FusedRMSNorm(model)
    assert fused.wrapped == 2 * 2 + 1 + (4 if arch == "qwen3" else 0), fused.skipped  # + q/k norms in Qwen3
    _assert_same_training(before, _loss_and_grads(model, autocast), tol)
    ids, mask = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    fused.remove()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_fused_rms_norm_node_matches_autograd_of_the_plain_ops():
    from train.fused_rms_norm import _RMSNorm

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 7, 16, generator=generator) * 3).requires_grad_()
    weight, upstream = torch.randn(16, generator=generator), torch.randn(4, 7, 16, generator=generator)
    (_RMSNorm.apply(x, weight, 1e-6) * upstream).sum().backward()
    ours, x.grad = x.grad, None
    plain = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    (plain * upstream).sum().backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-5, atol=1e-6)


def test_fused_rms_norm_leaves_norms_it_does_not_reproduce():
    model = _model("gemma2")  # Gemma's norm scales by 1 + weight, in fp32
    fused = FusedRMSNorm(model)
    assert fused.wrapped == 0 and "differs" in fused.skipped["Gemma2RMSNorm"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("dtype, autocast, tol", CASES)
def test_fused_attention_trains_like_eager(arch, dtype, autocast, tol, monkeypatch):
    model = _model(arch, dtype)
    before = _loss_and_grads(model, autocast)
    base = model.get_base_model()
    assert fused_attention.problem(base) is None
    fused = FusedAttention(base)
    calls = []
    node = fused_attention._Attention.apply
    monkeypatch.setattr(fused_attention._Attention, "apply", lambda *a: calls.append(1) or node(*a))
    _assert_same_training(before, _loss_and_grads(model, autocast), tol)
    assert len(calls) == 2  # both layers ran the node
    assert fused.checks["fused_attention"].startswith(f"{type(base.model.layers[0].self_attn).__name__} passed")
    fused.remove()
    assert base.config._attn_implementation == "eager"
    _assert_same_training(before, _loss_and_grads(model, autocast), 0.0)


def test_fused_attention_keeps_eager_for_soft_capping_and_passes_without_gradient(monkeypatch):
    model = _model("gemma2")  # attention logits soft-capped: eager's own function must run
    before = _loss_and_grads(model, False)
    fused = FusedAttention(model.get_base_model())
    _assert_same_training(before, _loss_and_grads(model, False), 0.0)
    assert fused.checks == {}  # the node never ran, so nothing was compared
    model = _model("llama")
    FusedAttention(model.get_base_model())
    ids, mask = _batch()
    monkeypatch.setattr(fused_attention._Attention, "apply", None)  # no gradient: DPO's reference pass, eval
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def test_fused_attention_falls_back_when_its_first_call_disagrees_with_eager(monkeypatch, caplog):
    model = _model("llama")
    before = _loss_and_grads(model, False)
    forward = fused_attention._Attention.forward

    def unscaled(ctx, query, key, value, mask, scaling):  # a node that forgot the 1/sqrt(d) scaling
        return forward(ctx, query, key, value, mask, 1.0)

    monkeypatch.setattr(fused_attention._Attention, "forward", staticmethod(unscaled))
    fused = FusedAttention(model.get_base_model())
    after = _loss_and_grads(model, False)
    assert fused.checks["fused_attention"].startswith("fell back (LlamaAttention fell back")
    assert "keeps its own" in caplog.text
    # the first layer's output came from eager; every later call ran eager too
    _assert_same_training(before, after, 0.0)


def test_fused_attention_only_replaces_eager():
    config_class, model_class, extra = ARCHITECTURES["llama"]
    model = model_class(config_class(**SHAPE, attn_implementation="sdpa"))
    assert "sdpa" in fused_attention.problem(model)


def test_fused_attention_stays_off_when_the_config_asks_for_attention_weights():
    config_class, model_class, extra = ARCHITECTURES["llama"]
    model = model_class(config_class(**SHAPE, attn_implementation="eager", output_attentions=True))
    ids, mask = _batch()
    assert model(ids, attention_mask=mask).attentions[0].shape == (3, 4, 13, 13)  # eager returns them
    # switched, transformers would return none: the speed-up must decline instead
    assert "output_attentions" in fused_attention.problem(model)


def test_fused_attention_leaves_tensor_valued_sinks_to_eager():
    model = _model("llama").get_base_model()
    FusedAttention(model)
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 5, 16, generator=generator, requires_grad=True)
    key, value = torch.randn(1, 2, 5, 16, generator=generator), torch.randn(1, 2, 5, 16, generator=generator)
    sinks = torch.zeros(4)  # gpt-oss passes its per-head sinks as `s_aux`: eager's own function decides
    out, _ = fused_attention.attention(module, query, key, value, None, scaling=0.25, s_aux=sinks)
    expected, _ = fused_attention.own_eager(module)(module, query, key, value, None, scaling=0.25)
    assert torch.equal(out, expected) and fused_attention.checks == {}
