"""The ``cpp`` backend (C++ CPU extension): build, registration and the extension's own checks.
Its numbers are checked by tests/test_loss_conformance.py.

The first test in this file builds the extension (about a minute on 2 cores, then cached on disk
under FASTUNLEARN_BUILD_DIR or ~/.cache/fastunlearn). If the build fails, every test fails with
the compiler output: a broken C++ file must not pass CI as a skip.
"""
import pytest
import torch

from fastunlearn.losses.registry import get_backend, resolve_backend


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    from fastunlearn.losses import cpp_backend

    return cpp_backend.load()  # raises ExtensionBuildError with the compiler output


def test_cpp_registered_and_auto_prefers_it_on_cpu():
    backend = get_backend("cpp")
    assert backend is not None and backend.priority > get_backend("chunked").priority
    ok, why = backend.available("cpu")
    assert ok, why
    assert not backend.available("cuda")[0]
    chosen = resolve_backend("auto", "cpu")  # cpp, unless a higher one (triton interpreter) runs
    assert chosen.name == "cpp" or chosen.priority > backend.priority


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.tensor([5, 0, 1])), "outside the vocabulary"),
    (dict(kind=torch.tensor([0, 7, 1])), "kind must be 0"),
    (dict(hidden=torch.randn(3, 5)), "weight must be"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), "integer"),
])
def test_extension_checks_its_own_inputs(bad, match):
    """The extension refuses bad input itself too (its entry point is public in the module)."""
    from fastunlearn.losses import cpp_backend

    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), labels=torch.tensor([1, 2, 3]),
                kind=torch.tensor([0, 1, 1]))
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        cpp_backend.load().forward_backward(
            args["hidden"], args["weight"], args["labels"], args["kind"], None, None, None,
            None, 0.5, 1.0, 1.0, 0.0, 1.0, False, -100, 4, True, True)


# ---- the JIT build helper ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ref_start", [5, 2, 0])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_row_pass_for_the_driver_equals_the_pytorch_pass(ref_start, softcap, dtype):
    """The extension's row pass behind the driver's contract (bf16 heads and token_stats on cpp)
    against the PyTorch pass: values and dZ, with biases, a reference suffix and -inf logits."""
    from fastunlearn.losses import cpp_backend
    from fastunlearn.losses.driver import torch_row_pass

    g = torch.Generator().manual_seed(ref_start)
    rows, vocab, h = 5, 97, 8
    hc = torch.randn(rows, h, generator=g).to(dtype)
    w = torch.randn(vocab, h, generator=g).to(dtype)
    zr = (torch.randn(rows - ref_start, vocab, generator=g) * 3).to(dtype) \
        if ref_start < rows else None
    if zr is not None:
        zr[:, :3] = float("-inf")  # masked vocabulary entries
    labels = torch.randint(3, vocab, (rows,), generator=g)
    scale = torch.randn(rows, generator=g)
    bias, ref_bias = torch.randn(vocab, generator=g), torch.randn(vocab, generator=g)
    args = (labels, scale, ref_start, hc, w, bias, ref_bias, softcap)
    z_want, z_got = hc @ w.t(), hc @ w.t()
    want = torch_row_pass(z_want, None if zr is None else zr.clone(), *args)
    got = cpp_backend.row_pass(z_got, None if zr is None else zr.clone(), *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(z_got, z_want, rtol=1e-5, atol=1e-6)
    else:  # the same fp32 dZ, rounded to bf16: at most one unit in the last place apart
        torch.testing.assert_close(z_got.float(), z_want.float(), rtol=2**-7, atol=1e-6)


def test_row_pass_refuses_a_label_outside_the_vocabulary():
    from fastunlearn.losses import cpp_backend

    z, labels = torch.randn(2, 7), torch.tensor([1, 7])
    with pytest.raises(RuntimeError, match="outside"):
        cpp_backend.load().row_pass(z, None, labels, torch.ones(2), 2, None, None, None, 0.0)


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
