"""nn.Linear layers routed through oneDNN on CPU (fastunlearn/cpu_linear.py) against F.linear."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastunlearn import cpu_linear
from tests.tiny_model import tiny_llama


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    from fastunlearn.losses import cpp_backend

    ext = cpp_backend.load()  # a build failure fails these tests with the compiler output
    if ext.gemm_engine() != "onednn":
        pytest.skip("this torch has no usable oneDNN matmul")
    return ext


def _grads(layer, x):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in (x, layer.weight, layer.bias) if t is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (3, 1, 4, 13)])
def test_forward_and_grads_match_f_linear(bias, shape):
    torch.manual_seed(0)
    plain = nn.Linear(13, 11, bias=bias)
    swapped = copy.deepcopy(plain)
    assert cpu_linear.use_onednn_linears(swapped, "onednn") == 1
    x = torch.randn(*shape)
    y_ref, g_ref = _grads(plain, x)
    y, g = _grads(swapped, x)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_frozen_weight():
    torch.manual_seed(1)
    layer = nn.Linear(8, 6)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    ref = copy.deepcopy(layer)
    cpu_linear.use_onednn_linears(layer, "onednn")
    x = torch.randn(8, 10).t().requires_grad_(True)  # (10, 8), transposed strides
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


def test_model_outputs_and_grads_match():
    model = tiny_llama(seed=4).train()
    swapped = copy.deepcopy(model)
    n = cpu_linear.use_onednn_linears(swapped, "onednn")
    assert n == 2 * 7 + 1  # q k v o gate up down in each of 2 layers, and lm_head
    ids = torch.randint(6, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for m in (model, swapped):
        m(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(swapped(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_autocast_and_other_dtypes_fall_back_to_f_linear(monkeypatch):
    layer = nn.Linear(4, 3)
    cpu_linear.use_onednn_linears(layer, "onednn")
    calls = []
    monkeypatch.setattr(cpu_linear._OneDnnLinear, "apply",
                        lambda *a: calls.append(1) or F.linear(*a))
    layer(torch.randn(2, 4))
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    layer.double()(torch.randn(2, 4, dtype=torch.float64))
    layer.float()(torch.randn(0, 4))  # no rows: nothing for oneDNN to do
    assert calls == [1]


def test_restore_and_modes():
    layer = nn.Linear(4, 3)
    assert cpu_linear.use_onednn_linears(layer, "torch") == 0
    assert "forward" not in layer.__dict__
    cpu_linear.use_onednn_linears(layer, "onednn")
    assert "forward" in layer.__dict__
    clone = copy.deepcopy(layer)  # the swap travels with copies (the reference model)
    assert clone.forward.__self__ is clone
    cpu_linear.restore_linears(layer)
    assert "forward" not in layer.__dict__
    with pytest.raises(ValueError, match="cpu_linear must be one of"):
        cpu_linear.use_onednn_linears(layer, "mkl")


def test_auto_decides_per_shape(monkeypatch):
    """Each weight shape gets its own decision: a model whose shapes rank differently keeps
    torch's GEMMs where they win, instead of following the most common shape."""
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32))
    asked = []

    def faster(i, o, rows, gemms):
        asked.append((i, o, rows, gemms))
        return (i, o) == (16, 32)

    monkeypatch.setattr(cpu_linear, "onednn_is_faster", faster)
    assert cpu_linear.use_onednn_linears(model, "auto", rows=96) == 2
    assert sorted(asked) == [(16, 32, 96, "forward+dx+dw"), (32, 16, 96, "forward+dx+dw")]
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__


def test_auto_decides_from_the_gemms_a_layer_runs(monkeypatch):
    """A frozen reference runs only forward GEMMs, a frozen layer inside a trained model the
    forward and dX: each is decided from those, not from the three GEMMs of a trained layer."""
    asked = set()
    real = cpu_linear.onednn_is_faster

    def faster(i, o, rows, gemms):
        asked.add(((i, o), gemms))
        return gemms == "forward"

    monkeypatch.setattr(cpu_linear, "onednn_is_faster", faster)
    reference = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)).requires_grad_(False)
    assert cpu_linear.use_onednn_linears(reference, "auto") == 2
    assert asked == {((16, 32), "forward"), ((32, 16), "forward")}
    asked.clear()
    partly = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    partly[0].requires_grad_(False)
    assert cpu_linear.use_onednn_linears(partly, "auto") == 0
    assert asked == {((16, 32), "forward+dx"), ((32, 16), "forward+dx+dw")}
    with pytest.raises(ValueError, match="gemms must be one of"):
        real(4, 4, 16, "backward")


def _recording_ext(shapes):
    ext = cpu_linear._ext()

    class Recording:
        def gemm_engine(self):
            return "onednn"

        def gemm(self, a, b, out, beta):
            shapes.append((tuple(a.shape), tuple(b.shape)))
            return ext.gemm(a, b, out, beta)
    return Recording()


def test_timing_covers_forward_and_backward_gemms(monkeypatch):
    """The decision times three GEMMs per library (y = x W^T, dX = dY W, dW = dY^T X) at the
    requested rows, capped for vocabulary-sized heads; only the forward for a reference."""
    monkeypatch.setattr(cpu_linear, "_FASTER", {})
    shapes = []
    recording = _recording_ext(shapes)
    monkeypatch.setattr(cpu_linear, "_ext", lambda: recording)
    cpu_linear.onednn_is_faster(12, 20, rows=40)
    assert set(shapes) == {((40, 12), (12, 20)), ((40, 20), (20, 12)), ((20, 40), (40, 12))}
    shapes.clear()
    cpu_linear.onednn_is_faster(12, 20, rows=40, gemms="forward")
    assert set(shapes) == {((40, 12), (12, 20))}
    shapes.clear()
    cpu_linear.onednn_is_faster(12, 20, rows=40, gemms="forward+dx")
    assert set(shapes) == {((40, 12), (12, 20)), ((40, 20), (20, 12))}
    shapes.clear()
    monkeypatch.setattr(cpu_linear, "_TIMING_FLOP_BUDGET", 2 * 12 * 20 * 24)
    cpu_linear.onednn_is_faster(12, 20, rows=4096)
    assert shapes[0][0] == (24, 12)


def test_timing_survives_a_burst_of_other_load(monkeypatch):
    """On a shared machine, other work can slow every GEMM for a while. oneDNN costs 1 unit
    per GEMM and torch 2 here, and the first 12 GEMMs run 10x slower: timing one library after
    the other would see only oneDNN slowed and pick torch; alternating rounds compare the two
    under the same load."""
    clock = {"now": 0.0, "calls": 0}

    def spend(units):
        clock["now"] += units * (10 if clock["calls"] < 12 else 1)
        clock["calls"] += 1

    class FakeExt:
        def gemm_engine(self):
            return "onednn"

        def gemm(self, a, b, out, beta):
            spend(1)

    monkeypatch.setattr(cpu_linear, "_FASTER", {})
    monkeypatch.setattr(cpu_linear, "_ext", lambda: FakeExt())
    monkeypatch.setattr(cpu_linear.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(cpu_linear.torch, "mm", lambda *a, **k: spend(2))
    assert cpu_linear.onednn_is_faster(8, 8, rows=16)


def test_build_failure_auto_swaps_nothing_onednn_raises(monkeypatch):
    from fastunlearn.losses._build import ExtensionBuildError

    def broken():
        raise ExtensionBuildError("building the fastunlearn extension failed: test")

    monkeypatch.setattr(cpu_linear, "_ext", broken)
    monkeypatch.setattr(cpu_linear, "_FASTER", {})
    layer = nn.Linear(4, 3)
    assert cpu_linear.try_onednn_linears(layer) == 0
    assert "forward" not in layer.__dict__
    with pytest.raises(ExtensionBuildError):
        cpu_linear.use_onednn_linears(layer, "onednn")
