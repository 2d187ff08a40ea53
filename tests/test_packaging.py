"""Packaging: a lean core, the wheel and the sdist as a user gets them, the build notice."""
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastunlearn

ROOT = Path(__file__).resolve().parents[1]

# Everything outside the core (torch): the extras' modules and what they pull in.
EXTRA_MODULES = ("transformers", "tokenizers", "yaml", "tqdm", "matplotlib", "safetensors",
                 "gguf", "numpy", "peft", "triton", "accelerate", "pyarrow", "datasets", "pandas")

# Runs in a subprocess where the modules above are not installed as far as imports can tell
# (the path finder does not see them), as after `pip install fastunlearn` with torch only.
LEAN_SCRIPT = """
import importlib.machinery, sys, warnings
HIDDEN = set(sys.argv[1].split(","))

class WithoutExtras(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [WithoutExtras if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
warnings.simplefilter("ignore")  # torch: "Failed to initialize NumPy"
import torch
import fastunlearn
from fastunlearn import unlearn_loss

torch.manual_seed(0)
h = torch.randn(6, 8, requires_grad=True)
w = torch.randn(11, 8)
labels = torch.tensor([1, 2, 3, 4, 5, -100])
kind = torch.tensor([0, 0, 1, 1, 2, 2])
out = unlearn_loss(h, w, labels, kind, h.detach() + 0.1, backend="chunked")
out.loss.backward()
ref = fastunlearn.losses.unlearn_loss_ref(h.detach(), w, labels, kind, h.detach() + 0.1)
assert torch.allclose(out.loss.detach(), ref.loss, atol=1e-5), (out.loss, ref.loss)
assert torch.isfinite(h.grad).all()
print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & HIDDEN))
from fastunlearn.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _lean(*cli_args):
    return subprocess.run([sys.executable, "-c", LEAN_SCRIPT, ",".join(EXTRA_MODULES),
                           *cli_args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_core_imports_and_computes_the_loss_with_torch_only():
    r = _lean("backends")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: []" in r.stdout
    assert "chunked" in r.stdout and "available" in r.stdout


@pytest.mark.parametrize("command", [["run", "--out", "never-written"],
                                     ["eval", "--model", "never-read"]])
def test_cli_names_the_missing_extra_in_one_line(command):
    r = _lean(*command)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastunlearn: error: ")
    assert "pip install 'fastunlearn[train]'" in err[0]
    assert not (ROOT / "never-written").exists()


def test_version_is_the_distribution_version(capsys):
    from fastunlearn.cli import main

    assert fastunlearn.__version__ == importlib.metadata.version("fastunlearn")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastunlearn {fastunlearn.__version__}"


def test_first_build_says_it_is_compiling(monkeypatch, tmp_path, caplog):
    from torch.utils import cpp_extension

    from fastunlearn.losses import _build

    calls = []
    monkeypatch.setattr(_build.shutil, "which", lambda _: "/usr/bin/ninja")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    assert _build._compile("demo_ext", [tmp_path / "a.cpp"], tmp_path, [], [], [], False) \
        == "module"
    # A warning, so that it shows without any logging setup (tests/test_logging.py).
    err = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert calls and len(err) == 1
    assert "compiling the C++ extension 'demo_ext'" in err[0] and "minutes" in err[0]


# --------------------------------------------------------------------------- wheel and sdist

def _setuptools_ok() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77


def _source_copy(dest: Path) -> Path:
    """The project's files (what git would ship: tracked and new, not ignored) in ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build",
                                    "dist", ".git", ".pytest_cache", ".ruff_cache",
                                    ".hypothesis", ".benchmarks", "runs", ".venv")
    listed = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode == 0:
            listed = [p for p in r.stdout.split("\0") if p and (ROOT / p).is_file()]
    if listed is None:
        shutil.copytree(ROOT, dest, ignore=ignore)
        return dest
    for rel in listed:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(wheel, sdist) built offline from a copy of the source tree."""
    if not _setuptools_ok():
        pytest.skip("building offline needs setuptools >= 77 in this environment")
    base = tmp_path_factory.mktemp("pkg")
    src = _source_copy(base / "src")
    out = base / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                        "--no-build-isolation", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "build_meta.build_sdist(sys.argv[1])", str(out)], cwd=src,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for log in (r.stdout + r.stderr).splitlines():  # the package list is complete
        assert "is absent from the `packages` configuration" not in log, log
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz"))


def _expected_wheel_files() -> set[str]:
    def files(folder: Path, pattern: str, prefix: str):
        return {prefix + p.relative_to(folder).as_posix() for p in folder.rglob(pattern)
                if p.is_file() and "__pycache__" not in p.parts}

    pkg = ROOT / "fastunlearn"
    want = files(pkg, "*.py", "fastunlearn/")
    want |= files(pkg / "configs", "*.yaml", "fastunlearn/configs/")
    want |= files(pkg / "recipes" / "data", "*", "fastunlearn/recipes/data/")
    want |= files(pkg / "eval" / "judge", "*", "fastunlearn/eval/judge/")
    want |= files(ROOT / "triton_kernels", "*.py", "fastunlearn/triton_kernels/")
    for ext in ("*.cpp", "*.cu", "*.h", "*.cuh", "*.py"):
        want |= files(ROOT / "csrc", ext, "fastunlearn/csrc/")
    return want


def test_wheel_holds_every_module_data_file_and_the_license(dists):
    wheel, _ = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_wheel_files() - names
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {sorted(missing)}"
    lic = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert lic and "Apache License" in zipfile.ZipFile(wheel).read(lic[0]).decode()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:")
                and "extra ==" not in ln]
    assert requires == ["Requires-Dist: torch>=2.4"], requires  # the lean core
    assert "License-Expression: Apache-2.0" in meta


def test_sdist_tests_collect(dists, tmp_path):
    _, sdist = dists
    with tarfile.open(sdist) as t:
        t.extractall(tmp_path, filter="data")
    root = next(tmp_path.iterdir())
    for need in ("LICENSE", "tests/conftest.py", "tests/tiny_model.py", "tests/loss_cases.py"):
        assert (root / need).is_file(), need
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider"], cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "error" not in r.stdout.lower().split("\n")[-2], r.stdout[-2000:]


def _venv_with_wheel(wheel: Path, where: Path) -> Path:
    """A fresh venv holding the wheel; torch and the other dependencies come from this
    environment's site-packages through a .pth path line (its .pth hooks, like an editable
    install of fastunlearn, are not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    import site as outer_site

    Path(site.stdout.strip(), "outer_env.pth").write_text(
        "\n".join(outer_site.getsitepackages()) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return where / "bin"


@pytest.fixture(scope="module")
def wheel_env(dists, tmp_path_factory):
    """(run, work folder): commands run in a folder outside the source tree, with the venv
    holding the wheel first on PATH."""
    wheel, _ = dists
    base = tmp_path_factory.mktemp("wheel_env")
    bin_dir = _venv_with_wheel(wheel, base / "venv")
    work = base / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    def run(*args):
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)

    return run, work


def test_wheel_cli_from_outside_the_source_tree(wheel_env):
    run, work = wheel_env
    r = run("python", "-c", "import fastunlearn; print(fastunlearn.__file__, "
            "fastunlearn.__version__)")
    assert r.returncode == 0, r.stderr[-2000:]
    path, version = r.stdout.split()
    assert "venv" in Path(path).parts and version == fastunlearn.__version__, r.stdout
    r = run("fastunlearn", "backends")
    assert r.returncode == 0 and "chunked" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow  # about 40 s alone, 90 s on a busy 2-core machine
def test_wheel_two_step_run(wheel_env):
    from tests.tiny_model import tiny_llama, tiny_tokenizer

    run, work = wheel_env
    tiny_llama(128, seed=0).save_pretrained(work / "model")
    tiny_tokenizer().save_pretrained(work / "model")
    (work / "forget.jsonl").write_text("".join(
        json.dumps({"prompt": f"bad request {i}", "answer": f"bad answer {i}"}) + "\n"
        for i in range(10)))
    # The normal set is the bundled harmful recipe's (TruthfulQA): package data must be there.
    r = run("fastunlearn", "run", "--quiet", "--out", "run", "model.name=model",
            "data.forget_file=forget.jsonl", "data.n_normal=8", "data.n_heldout=2",
            "data.max_length=48", "train.steps=2", "train.lr=1e-3", "train.device=cpu",
            "loss.backend=chunked", "eval.generate=false")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
