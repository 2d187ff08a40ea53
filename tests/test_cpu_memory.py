"""glibc keeps freed memory: large buffers freed and allocated again reuse the same pages."""
import ctypes
import ctypes.util
import resource
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from fastunlearn.cpu_memory import keep_freed_memory
        assert keep_freed_memory()
    def faults_of_one_step():  # buffers of a training step's sizes, allocated and freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        big = [torch.ones(n << 20, dtype=torch.uint8) for n in (113, 40, 113)]
        small = [torch.ones(5 << 20, dtype=torch.uint8) for _ in range(8)]
        del big, small
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_step(), faults_of_one_step()  # the heap reaches its size
    print(sum(faults_of_one_step() for _ in range(6)))
""")


def _is_glibc() -> bool:
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _is_glibc(), reason="glibc only")
def test_freed_large_buffers_are_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    pages = 6 * (266 << 20) // resource.getpagesize()
    assert default > pages // 2  # the blocks above the mmap threshold fault in every step
    assert 3 * kept < default  # mostly the same pages, reused


def test_trainer_on_cpu_keeps_freed_memory(monkeypatch):
    from fastunlearn import trainer as trainer_module
    from tests.test_trainer import make_trainer, tiny_cfg

    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1))
    for keep in (True, False):
        cfg = tiny_cfg()
        cfg.train.keep_freed_memory = keep
        make_trainer(cfg).setup_runtime()
    assert calls == [1]
