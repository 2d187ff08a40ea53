"""bf16 attention on CPU computed on fp32 copies where faster (fastunlearn/cpu_attention.py)."""
import json

import pytest
import torch

from fastunlearn import cpu_attention
from tests.test_trainer import make_trainer, tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_llama, tiny_tokenizer


@pytest.fixture
def choose(monkeypatch):
    """Force the per-shape choice: choose(True) runs fp32 attention, choose(False) native."""
    def set_choice(fp32: bool):
        monkeypatch.setattr(cpu_attention, "fp32_is_faster", lambda q, k: fp32)
    return set_choice


def _attention_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


class _Module(torch.nn.Module):  # what HF's attention functions read from the layer
    num_key_value_groups = 2
    is_causal = True


def _grads_and_out(fn, dtype):
    q, k, v = _attention_inputs(dtype)
    out, _ = fn(_Module(), q, k, v, None, scaling=8 ** -0.5)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return [out.detach().double(), *(t.grad.double() for t in (q, k, v))]


def test_fp32_attention_is_at_least_as_close_to_float64_as_native_bf16(choose):
    """The specification: HF's sdpa in float64. fp32 attention on bf16 inputs returns bf16
    outputs and gradients at least as close to it as bf16 attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    want = _grads_and_out(sdpa_attention_forward, torch.float64)
    native = _grads_and_out(sdpa_attention_forward, torch.bfloat16)
    choose(True)
    got = _grads_and_out(cpu_attention.cpu_sdpa_attention, torch.bfloat16)
    assert not all(torch.equal(n, x) for n, x in zip(native, got))  # fp32 really ran
    for name, w, n, x in zip(("out", "dq", "dk", "dv"), want, native, got):
        err_native = float((n - w).abs().max())
        err_fp32 = float((x - w).abs().max())
        assert err_fp32 <= err_native * 1.01 + 1e-6, (name, err_fp32, err_native)
        assert err_fp32 < 0.05 * max(1.0, float(w.abs().max())), name


def test_native_choice_and_other_dtypes_are_hf_sdpa_exactly(choose):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    choose(False)
    for dtype in (torch.bfloat16, torch.float32):
        want = _grads_and_out(sdpa_attention_forward, dtype)
        got = _grads_and_out(cpu_attention.cpu_sdpa_attention, dtype)
        for w, x in zip(want, got):
            assert torch.equal(w, x)
    choose(True)  # fp32 inputs are never touched
    want = _grads_and_out(sdpa_attention_forward, torch.float32)
    got = _grads_and_out(cpu_attention.cpu_sdpa_attention, torch.float32)
    assert all(torch.equal(w, x) for w, x in zip(want, got))


def test_the_choice_is_timed_once_per_shape_bucket(monkeypatch):
    calls = []

    def fake_ratio(first, second, rounds):
        first(), second()  # both ways must run on the bucket's shapes
        calls.append(rounds)
        return 0.5

    monkeypatch.setattr(cpu_attention, "median_ratio", fake_ratio)
    monkeypatch.setattr(cpu_attention, "_FP32_FASTER", {})
    q = torch.zeros(1, 4, 100, 8, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 100, 8, dtype=torch.bfloat16)
    assert cpu_attention.fp32_is_faster(q, k)
    assert cpu_attention.fp32_is_faster(q[:, :, :120], k[:, :, :120])  # same bucket (128)
    assert len(calls) == 1
    cpu_attention.fp32_is_faster(q[:, :, :60], k[:, :, :60])  # bucket 64: timed again
    assert len(calls) == 2


def test_a_switched_model_computes_alike_with_and_without_autograd(choose, tmp_path):
    """The choice does not depend on grad mode; saving does not record the attention name."""
    choose(True)
    model = tiny_llama(64).to(torch.bfloat16)
    ids = torch.randint(3, 64, (2, 12))
    stock = model(input_ids=ids).logits.detach()
    assert cpu_attention.use_fp32_attention_where_faster(model)
    assert model.config._attn_implementation == cpu_attention.ATTN_NAME
    with torch.no_grad():
        no_grad = model(input_ids=ids).logits
    with_grad = model(input_ids=ids).logits
    assert torch.equal(no_grad, with_grad.detach())
    torch.testing.assert_close(with_grad.detach().float(), stock.float(), rtol=0.05, atol=0.05)
    with_grad.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    assert cpu_attention.ATTN_NAME not in json.dumps(json.loads(
        (tmp_path / "config.json").read_text()))
    cpu_attention.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_eager_models_are_left_alone():
    model = tiny_llama(64)
    model.set_attn_implementation("eager")
    assert not cpu_attention.use_fp32_attention_where_faster(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("weights,mode,switched", [
    (torch.bfloat16, "auto", True), (torch.bfloat16, "native", False),
    (torch.float32, "auto", False)])
def test_trainer_switches_low_precision_cpu_runs(weights, mode, switched):
    from fastunlearn.trainer import Trainer

    cfg = tiny_cfg(steps=1, cpu_attention=mode)
    if weights == torch.float32:
        trainer = make_trainer(cfg)
    else:
        trainer = Trainer(cfg, model=tiny_llama(128).to(weights), tokenizer=tiny_tokenizer(),
                          recipe=tiny_recipe(), progress=False)
    trainer.setup()
    names = {m.config._attn_implementation for m in (trainer.policy, trainer.reference)}
    assert names == ({cpu_attention.ATTN_NAME} if switched else {"sdpa"})
    trainer.train_step()
