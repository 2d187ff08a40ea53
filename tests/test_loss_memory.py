"""What the fused backends allocate and compute, counted with a dispatch mode on CPU.

* The backward allocates no tensor of V x H elements or more: the gradients are computed in
  the forward and only scaled in place (no zero-filled gradients for the op's other outputs,
  no second copy of dW).
* A frozen head (LoRA), or a call under no_grad, runs no dW GEMM at all.
"""
import pytest
import torch

from fastunlearn.losses import unlearn_loss
from fastunlearn.losses.probe import AllocationRecorder
from tests.loss_cases import loss_backends, make_case

BT, H, V = 24, 16, 40


def _memory_backends():
    return loss_backends(fused_only=True)


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FASTUNLEARN_TRITON_BLOCK_V", "16")
    if name == "cpp":
        # the oneDNN path calls its GEMM outside the dispatcher: count through at::mm
        from fastunlearn.losses import cpp_backend

        ext = cpp_backend.load()
        engine = ext.gemm_engine()
        ext.set_gemm("aten")
        yield name
        ext.set_gemm(engine)
        return
    yield name


def _inputs(dtype=torch.float32, frozen_head=False):
    h, w, y, k, rh, rw = make_case(BT, H, V, dtype=dtype, seed=4)
    h.requires_grad_()
    w.requires_grad_(not frozen_head)
    b = torch.randn(V, dtype=dtype, requires_grad=True)
    return h, w, y, k, rh, rw, b


@pytest.mark.parametrize("backend", _memory_backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_allocates_nothing_of_head_size(backend, dtype):
    h, w, y, k, rh, rw, b = _inputs(dtype)
    out = unlearn_loss(h, w, y, k, rh, rw, bias=b, backend=backend, chunk_rows=8)
    rec = AllocationRecorder()
    with rec:
        (out.loss * 0.5).backward()
    assert w.grad is not None and h.grad is not None and b.grad is not None
    assert rec.big_allocations(V * H) == [], rec.calls


def _dw_gemms(rec):
    return rec.gemms_with_output((V, H))


@pytest.mark.parametrize("backend", _memory_backends(), indirect=True)
def test_frozen_head_runs_no_dw_gemm(backend):
    h, w, y, k, rh, rw, b = _inputs(frozen_head=True)
    rec = AllocationRecorder()
    with rec:
        out = unlearn_loss(h, w, y, k, rh, rw, bias=b, backend=backend, chunk_rows=8)
        out.loss.backward()
    assert w.grad is None and h.grad is not None
    assert _dw_gemms(rec) == []
    assert rec.big_allocations(V * H) == []  # nor any (V, H) buffer

    # the same head trainable: the dW GEMMs do show (the counting works)
    h, w, y, k, rh, rw, b = _inputs()
    rec = AllocationRecorder()
    with rec:
        unlearn_loss(h, w, y, k, rh, rw, bias=b, backend=backend, chunk_rows=8).loss.backward()
    assert len(_dw_gemms(rec)) >= 1


@pytest.mark.parametrize("backend", _memory_backends(), indirect=True)
def test_no_grad_runs_no_gradient_gemm(backend):
    h, w, y, k, rh, rw, b = _inputs()
    rec = AllocationRecorder()
    with torch.no_grad(), rec:
        out = unlearn_loss(h, w, y, k, rh, rw, bias=b, backend=backend, chunk_rows=8)
    assert out.loss.grad_fn is None
    assert _dw_gemms(rec) == []
    assert rec.big_allocations(V * H) == []
