"""The ``cpp`` backend (C++ CPU extension) against the fp64 reference.

The first test in this file builds the extension (about a minute on 2 cores, then cached on disk
under FASTUNLEARN_BUILD_DIR or ~/.cache/fastunlearn). If the build fails, every test fails with
the compiler output: a broken C++ file must not pass CI as a skip.
"""
import pytest
import torch

from fastunlearn.losses import unlearn_loss, unlearn_loss_ref
from fastunlearn.losses.registry import get_backend, resolve_backend
from tests.loss_cases import make_case, run_with_grads

TERMS = ("loss", "forget_nll", "mismatch_nll", "normal_kl")


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    from fastunlearn.losses import cpp_backend

    return cpp_backend.load()  # raises ExtensionBuildError with the compiler output


def _compare(got, ref, grads_got, grads_ref):
    assert got.backend == "cpp"
    for name in TERMS:
        torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name).double(),
                                   rtol=1e-5, atol=1e-6, msg=name)
    for name in ("n_forget", "n_mismatch", "n_normal"):
        assert int(getattr(got, name)) == int(getattr(ref, name)), name
    for g, r in zip(grads_got, grads_ref):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 31, 123), (5, 3, 7), (64, 16, 300), (40, 8, 5000)])
@pytest.mark.parametrize("chunk_rows", [None, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpp_matches_reference(shape, chunk_rows, reduction):
    h, w, y, k, rh, rw = make_case(*shape, dtype=torch.float32, seed=sum(shape))
    ref, gh, gw, _ = run_with_grads(lambda a, b_, _c: unlearn_loss_ref(
        a.double(), b_.double(), y, k, rh.double(), rw.double(), reduction=reduction), h, w)
    got, ch, cw, _ = run_with_grads(lambda a, b_, _c: unlearn_loss(
        a, b_, y, k, rh, rw, reduction=reduction, backend="cpp", chunk_rows=chunk_rows), h, w)
    _compare(got, ref, (ch, cw), (gh, gw))


@pytest.mark.parametrize("grad_output", [1.0, 2.0, -1.0])
def test_cpp_grad_output_bias_softcap(grad_output):
    h, w, y, k, rh, rw = make_case(29, 12, 77, dtype=torch.float32, seed=3, scale=3.0)
    b = torch.randn(77)
    kw = dict(softcap=8.0, eps_forget=0.7, eps_mismatch=1.3, eps_normal=0.9)
    ref = run_with_grads(lambda a, b_, c: unlearn_loss_ref(
        a.double(), b_.double(), y, k, rh.double(), rw.double(), bias=c.double(),
        ref_bias=c.double(), **kw), h, w, b, grad_output)
    got = run_with_grads(lambda a, b_, c: unlearn_loss(
        a, b_, y, k, rh, rw, bias=c, ref_bias=c.detach(), backend="cpp", chunk_rows=8, **kw),
        h, w, b, grad_output)
    _compare(got[0], ref[0], got[1:], ref[1:])


def test_cpp_sum_reduction_with_bias_no_softcap():
    h, w, y, k, rh, rw = make_case(33, 10, 250, dtype=torch.float32, seed=11)
    b, rb = torch.randn(250), torch.randn(250)
    ref = run_with_grads(lambda a, b_, c: unlearn_loss_ref(
        a.double(), b_.double(), y, k, rh.double(), rw.double(), bias=c.double(),
        ref_bias=rb.double(), reduction="sum"), h, w, b)
    got = run_with_grads(lambda a, b_, c: unlearn_loss(
        a, b_, y, k, rh, rw, bias=c, ref_bias=rb, reduction="sum", backend="cpp"), h, w, b)
    _compare(got[0], ref[0], got[1:], ref[1:])


@pytest.mark.parametrize("kinds", [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2)])
def test_cpp_kind_absent(kinds):
    h, w, y, k, rh, rw = make_case(31, 9, 61, dtype=torch.float32, seed=5, kinds=kinds)
    ref = run_with_grads(lambda a, b_, _c: unlearn_loss_ref(
        a.double(), b_.double(), y, k, rh.double(), rw.double()), h, w)
    got = run_with_grads(lambda a, b_, _c: unlearn_loss(a, b_, y, k, rh, rw, backend="cpp",
                                                         chunk_rows=5), h, w)
    _compare(got[0], ref[0], got[1:], ref[1:])
    for i, name in enumerate(("n_forget", "n_mismatch", "n_normal")):
        if i not in kinds:
            assert int(getattr(got[0], name)) == 0


def test_cpp_without_reference_drops_kl():
    h, w, y, k, _rh, _rw = make_case(30, 8, 45, dtype=torch.float32, seed=9)
    ref = run_with_grads(lambda a, b_, _c: unlearn_loss_ref(a.double(), b_.double(), y, k), h, w)
    got = run_with_grads(lambda a, b_, _c: unlearn_loss(a, b_, y, k, backend="cpp"), h, w)
    _compare(got[0], ref[0], got[1:], ref[1:])
    assert int(got[0].n_normal) == 0 and float(got[0].normal_kl) == 0.0


def test_cpp_all_rows_ignored():
    h, w, y, k, rh, rw = make_case(20, 8, 50, dtype=torch.float32)
    out, gh, gw, _ = run_with_grads(lambda a, b_, _c: unlearn_loss(
        a, b_, torch.full_like(y, -100), k, rh, rw, backend="cpp"), h, w)
    assert float(out.loss) == 0.0
    assert int(out.n_forget) + int(out.n_mismatch) + int(out.n_normal) == 0
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_cpp_kl_zero_when_reference_is_policy():
    h, w, y, _k, _rh, _rw = make_case(24, 16, 300, dtype=torch.float32, seed=2)
    only_normal = torch.full_like(y, 2)
    out, gh, gw, _ = run_with_grads(lambda a, b_, _c: unlearn_loss(
        a, b_, y, only_normal, a.detach(), b_.detach(), backend="cpp"), h, w)
    assert int(out.n_normal) > 0
    assert out.normal_kl.abs() < 1e-6
    assert gh.abs().max() < 1e-6 and gw.abs().max() < 1e-6


def test_cpp_non_contiguous_hidden_and_tied_weights():
    h, w, y, k, rh, rw = make_case(30, 16, 40, dtype=torch.float32)
    wide = torch.randn(30, 32)
    wide[:, ::2] = h
    h_nc = wide[:, ::2]
    assert not h_nc.is_contiguous()
    emb = torch.nn.Embedding(40, 16)
    wt = emb.weight  # tied: the head is the input embedding
    out = unlearn_loss(h_nc, wt, y, k, rh, wt, backend="cpp")
    ref = unlearn_loss_ref(h.double(), wt.double(), y, k, rh.double(), wt.double())
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    wd = wt.detach().double().requires_grad_()
    unlearn_loss_ref(h.double(), wd, y, k, rh.double(), wd.detach()).loss.backward()
    torch.testing.assert_close(emb.weight.grad.double(), wd.grad, rtol=1e-4, atol=1e-6)


def test_cpp_bf16_inputs_close_to_fp32_reference():
    h, w, y, k, rh, rw = make_case(40, 32, 200, dtype=torch.float32, seed=4)
    hb, wb, rhb, rwb = (t.bfloat16() for t in (h, w, rh, rw))
    out = unlearn_loss(hb.requires_grad_(), wb, y, k, rhb, rwb, backend="cpp")
    ref = unlearn_loss_ref(hb.double(), wb.double(), y, k, rhb.double(), rwb.double())
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert hb.grad.dtype == torch.bfloat16


def test_cpp_frozen_head_or_hidden_skips_that_gradient():
    h, w, y, k, rh, rw = make_case(26, 8, 60, dtype=torch.float32, seed=12)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    unlearn_loss_ref(hd, wd, y, k, rh.double(), rw.double()).loss.backward()
    hg = h.clone().requires_grad_()  # frozen head (LoRA-style): only dX
    unlearn_loss(hg, w, y, k, rh, rw, backend="cpp").loss.backward()
    torch.testing.assert_close(hg.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)
    wg = w.clone().requires_grad_()  # frozen hidden states: only dW
    unlearn_loss(h, wg, y, k, rh, rw, backend="cpp").loss.backward()
    torch.testing.assert_close(wg.grad.double(), wd.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no grad at all: values only
        out = unlearn_loss(h, w, y, k, rh, rw, backend="cpp")
    assert not out.loss.requires_grad


def test_cpp_terms_are_detached_and_counts_int64():
    h, w, y, k, rh, rw = make_case(20, 8, 30, dtype=torch.float32)
    out = unlearn_loss(h.requires_grad_(), w, y, k, rh, rw, backend="cpp")
    assert out.loss.requires_grad
    assert not out.forget_nll.requires_grad and not out.normal_kl.requires_grad
    assert out.n_forget.dtype == torch.int64


def test_cpp_registered_and_auto_prefers_it_on_cpu():
    backend = get_backend("cpp")
    assert backend is not None and backend.priority > get_backend("chunked").priority
    ok, why = backend.available("cpu")
    assert ok, why
    assert not backend.available("cuda")[0]
    chosen = resolve_backend("auto", "cpu")  # cpp, unless a higher one (triton interpreter) runs
    assert chosen.name == "cpp" or chosen.priority > backend.priority


def test_cpp_torch_compile():
    from fastunlearn.losses.cpp_backend import cpp_unlearn_loss

    h, w, y, k, rh, rw = make_case(16, 8, 40, dtype=torch.float32, seed=6)
    kw = dict(eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)

    def f(a, b_):  # the op itself traces in one graph (fake impl + autograd formula)
        return cpp_unlearn_loss(a, b_, y, k, rh, rw, **kw).loss

    def g(a, b_):  # through the public API (backend resolution may break the graph)
        return unlearn_loss(a, b_, y, k, rh, rw, backend="cpp").loss

    he = h.clone().requires_grad_()
    expected = f(he, w)
    expected.backward()
    for fn, full in ((f, True), (g, False)):
        hc = h.clone().requires_grad_()
        loss = torch.compile(fn, backend="aot_eager", fullgraph=full)(hc, w)
        loss.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(hc.grad, he.grad)


def test_cpp_opcheck():
    from fastunlearn.losses import cpp_backend

    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    h, w, y, k, rh, rw = make_case(9, 4, 11, dtype=torch.float32, seed=1)
    args = (h.requires_grad_(), w, y, k, rh, rw, None, None, 0.5, 1.0, 1.0, 0.0, False, -100, 4,
            True, False)
    torch.library.opcheck(cpp_backend._apply, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.tensor([5, 0, 1])), "outside the vocabulary"),
    (dict(kind=torch.tensor([0, 7, 1])), "kind must be 0"),
    (dict(hidden=torch.randn(3, 5)), "weight must be"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), "integer"),
])
def test_cpp_bad_inputs_raise_clear_errors(bad, match):
    from fastunlearn.losses import cpp_backend

    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), labels=torch.tensor([1, 2, 3]),
                kind=torch.tensor([0, 1, 1]))
    args.update(bad)
    with pytest.raises((RuntimeError, ValueError), match=match):
        cpp_backend.cpp_unlearn_loss(args["hidden"], args["weight"], args["labels"], args["kind"],
                                     eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)


def test_cpp_bad_python_arguments():
    from fastunlearn.losses import cpp_backend

    h, w, y, k, rh, rw = make_case(5, 3, 7, dtype=torch.float32)
    kw = dict(eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)
    with pytest.raises(ValueError, match="reduction"):
        cpp_backend.cpp_unlearn_loss(h, w, y, k, rh, rw, reduction="max", **kw)
    with pytest.raises(ValueError, match="softcap"):
        cpp_backend.cpp_unlearn_loss(h, w, y, k, rh, rw, softcap=-1.0, **kw)
    with pytest.raises(ValueError, match="chunk_rows"):
        cpp_backend.cpp_unlearn_loss(h, w, y, k, rh, rw, chunk_rows=-3, **kw)


# ---- the JIT build helper ----

def test_build_failure_reports_compiler_output(tmp_path, monkeypatch):
    from fastunlearn.losses._build import ExtensionBuildError, load_extension

    monkeypatch.setenv("FASTUNLEARN_BUILD_DIR", str(tmp_path / "cache"))
    (tmp_path / "broken.cpp").write_text("int f() { return undefined_symbol_xyz; }\n")
    with pytest.raises(ExtensionBuildError, match="fu_test_broken") as info:
        load_extension("fu_test_broken", ["broken.cpp"], source_dir=tmp_path)
    assert "undefined_symbol_xyz" in str(info.value)  # the compiler's own message
    logs = list((tmp_path / "cache").glob("fu_test_broken-*/build_error.log"))
    assert logs and "undefined_symbol_xyz" in logs[0].read_text()
    # the failure is cached for the process: no second compile
    with pytest.raises(ExtensionBuildError):
        load_extension("fu_test_broken", ["broken.cpp"], source_dir=tmp_path)


def test_build_without_ninja_uses_setuptools_and_no_build_switch(tmp_path, monkeypatch):
    from fastunlearn.losses._build import ExtensionBuildError, load_extension

    monkeypatch.setenv("FASTUNLEARN_BUILD_DIR", str(tmp_path / "cache"))
    (tmp_path / "tiny.cpp").write_text(
        "#include <pybind11/pybind11.h>\n"
        "int twice(int x) { return 2 * x; }\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"twice\", &twice); }\n")
    monkeypatch.setenv("FASTUNLEARN_NO_BUILD", "1")
    with pytest.raises(ExtensionBuildError, match="FASTUNLEARN_NO_BUILD"):
        load_extension("fu_test_tiny_nobuild", ["tiny.cpp"], source_dir=tmp_path)
    monkeypatch.delenv("FASTUNLEARN_NO_BUILD")
    monkeypatch.setenv("FASTUNLEARN_BUILD_BACKEND", "setuptools")
    mod = load_extension("fu_test_tiny", ["tiny.cpp"], source_dir=tmp_path)
    assert mod.twice(21) == 42


def test_build_recovers_from_a_stale_torch_lock(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's 'lock' file; the next build must not wait forever."""
    import threading

    from fastunlearn.losses import _build

    monkeypatch.setenv("FASTUNLEARN_BUILD_DIR", str(tmp_path / "cache"))
    src = tmp_path / "tiny2.cpp"
    src.write_text("#include <pybind11/pybind11.h>\n"
                   "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
                   "  m.def(\"one\", [] { return 1; });\n}\n")
    build_dir = _build._build_dir("fu_test_stale", [src], ["False"])
    (build_dir / "lock").write_text("")  # left behind by a killed build
    with pytest.raises(_build.ExtensionBuildError, match="not built yet"):
        _build.load_extension("fu_test_stale", ["tiny2.cpp"], source_dir=tmp_path, build=False)
    result = {}
    t = threading.Thread(target=lambda: result.update(mod=_build.load_extension(
        "fu_test_stale", ["tiny2.cpp"], source_dir=tmp_path)), daemon=True)
    t.start()
    t.join(timeout=240)
    assert not t.is_alive(), "the build waited on a stale lock"
    assert result["mod"].one() == 1
