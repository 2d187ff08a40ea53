"""Lean RMSNorm / SwiGLU (fastunlearn/lean_layers.py) against the stock transformers modules."""
import copy

import pytest
import torch

from fastunlearn.lean_layers import activation_bytes_per_token, use_lean_layers
from tests.tiny_model import tiny_llama


def _run(model, ids, autocast):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _pair(seed=2, layers=3):
    stock = tiny_llama(seed=seed, layers=layers).train()
    lean = copy.deepcopy(stock)
    assert use_lean_layers(lean) == layers * 3 + 1  # 2 norms + 1 MLP per layer, final norm
    ids = torch.randint(6, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    return stock, lean, ids


def test_lean_model_matches_stock_model_fp32():
    stock, lean, ids = _pair()
    logits_s, grads_s = _run(stock, ids, False)
    logits_l, grads_l = _run(lean, ids, False)
    torch.testing.assert_close(logits_l, logits_s, rtol=0, atol=0)  # same forward operations
    for name, g in grads_s.items():
        torch.testing.assert_close(grads_l[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_lean_model_under_bf16_autocast_is_as_accurate_as_stock():
    """Same forward values; gradients no further from the fp32 ones than the stock module's
    (the lean backward keeps fp32 where autograd rounds some intermediates to bf16)."""
    stock, lean, ids = _pair()
    logits_s, grads_s = _run(stock, ids, True)
    logits_l, grads_l = _run(lean, ids, True)
    torch.testing.assert_close(logits_l, logits_s, rtol=0, atol=0)
    _, grads_fp32 = _run(copy.deepcopy(stock), ids, False)
    for name, exact in grads_fp32.items():
        scale = exact.abs().max()
        err_stock = (grads_s[name] - exact).abs().max() / scale
        err_lean = (grads_l[name] - exact).abs().max() / scale
        assert err_lean <= 2 * err_stock + 1e-3, (name, float(err_stock), float(err_lean))


def test_lean_layers_in_bf16_weights():
    stock = tiny_llama(seed=5).to(torch.bfloat16).train()
    lean = copy.deepcopy(stock)
    use_lean_layers(lean)
    ids = torch.randint(6, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    logits_s, grads_s = _run(stock, ids, False)
    logits_l, grads_l = _run(lean, ids, False)
    torch.testing.assert_close(logits_l, logits_s, rtol=0, atol=0)
    for name, g in grads_s.items():
        torch.testing.assert_close(grads_l[name].float(), g.float(), rtol=5e-2, atol=2e-2,
                                   msg=name)


def test_lean_layers_save_fewer_bytes_per_token():
    stock = tiny_llama(seed=0, hidden=64, layers=2).train()
    lean = copy.deepcopy(stock)
    use_lean_layers(lean)

    def per_token(model):  # difference of two lengths: parameter-sized copies cancel
        a = activation_bytes_per_token(model, torch.randint(6, 128, (2, 32)), torch.bfloat16)
        b = activation_bytes_per_token(model, torch.randint(6, 128, (2, 64)), torch.bfloat16)
        return (b * 128 - a * 64) / 64

    s, lean_bytes = per_token(stock), per_token(lean)
    assert lean_bytes < 0.8 * s, (s, lean_bytes)


def test_lora_model_with_lean_layers_trains():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=3).train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj",
                                                                         "q_proj"]))
    ref_logits = model(input_ids=torch.arange(6, 20)[None]).logits.detach()
    assert use_lean_layers(model) > 0
    out = model(input_ids=torch.arange(6, 20)[None], labels=torch.arange(6, 20)[None])
    torch.testing.assert_close(out.logits.detach(), ref_logits, rtol=0, atol=0)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_listed_rmsnorms_have_llamas_forward():
    """The lean RMSNorm reproduces LlamaRMSNorm.forward; every listed class must share it."""
    import importlib
    import inspect

    from fastunlearn.lean_layers import LLAMA_LIKE_RMSNORMS

    llama = importlib.import_module("transformers.models.llama.modeling_llama").LlamaRMSNorm
    source = inspect.getsource(llama.forward)
    assert "hidden_states.to(torch.float32)" in source and "self.weight * hidden_states.to(" \
        in source, source
    checked = 0
    for name in LLAMA_LIKE_RMSNORMS:
        module_name = name[: -len("RMSNorm")].lower()
        try:
            mod = importlib.import_module(f"transformers.models.{module_name}.modeling_"
                                          f"{module_name}")
        except ImportError:
            continue
        assert inspect.getsource(getattr(mod, name).forward) == source, name
        checked += 1
    assert checked >= 3


def test_activation_memory_benchmark_runs(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_activation_memory.py"
    spec = importlib.util.spec_from_file_location("bench_activation_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("OUT", raising=False)
    assert mod.main(["--out", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())
    assert len(rows) == 12  # 2 models x 3 precisions x stock / lean
    by = {(r["model"], r["precision"], r["impl"]): r["bytes_per_token_layer"] for r in rows}
    for (model, precision, impl), b in by.items():
        if impl == "lean":
            assert b < by[(model, precision, "stock")], (model, precision)


def _saved_bytes(fn, params):
    """Bytes autograd saves (each storage once, parameters and their casts left out) in fn()."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("swapped_down", [False, True])
def test_lean_mlp_saves_gate_and_up_only(swapped_down):
    """Fused path: x, gate and up are saved (not silu(gate), not the product). With a down_proj
    that is not a plain nn.Linear the product is saved by it, and the result is unchanged."""
    stock = tiny_llama(seed=3, layers=1).model.layers[0].mlp
    lean = copy.deepcopy(stock)
    use_lean_layers(lean)
    if swapped_down:  # what cpu_linear.py or a LoRA wrapper does: another forward
        down = lean.down_proj
        down.forward = lambda x, _d=down: torch.nn.functional.linear(x, _d.weight, _d.bias)
    tokens, inter = 10, stock.gate_proj.out_features
    x = torch.randn(1, tokens, stock.gate_proj.in_features, requires_grad=True)
    x_bytes = x.numel() * 4
    got = _saved_bytes(lambda: lean(x), list(lean.parameters()))
    expected = x_bytes + 2 * tokens * inter * 4 + (tokens * inter * 4 if swapped_down else 0)
    assert got == expected, (got, expected)
    assert _saved_bytes(lambda: stock(x), list(stock.parameters())) > got
    torch.testing.assert_close(lean(x), stock(x), rtol=0, atol=0)
