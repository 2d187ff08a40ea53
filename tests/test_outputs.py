"""The output rule (outputs.py): new or empty targets, never over an input, atomic writes, the
working folder as a lock, killed runs noticed, plain permissions."""
import os
import stat
import subprocess
import sys
import time

import pytest

from fastunlearn import outputs
from fastunlearn.outputs import (
    OutputError,
    atomic_dir,
    atomic_file,
    check_fresh_dir,
    claim_dir,
    free_name,
    publish_dir,
)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_dir_publishes_whole_with_plain_permissions(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out) as work:
        assert work.name == ".run.partial" and not out.exists()
        (work / "sub").mkdir()
        (work / "sub" / "f.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [p.name for p in out.iterdir()] == ["sub"]  # the owner mark is gone
    umask = os.umask(0)
    os.umask(umask)
    assert mode(out) == 0o777 & ~umask  # not mkdtemp's 0700
    assert mode(out / "sub" / "f.txt") == 0o666 & ~umask


def test_atomic_dir_removes_unfinished_work(tmp_path):
    for out in (tmp_path / "run", tmp_path / "new" / "deeper" / "run"):
        for exc in (RuntimeError("boom"), KeyboardInterrupt()):
            with pytest.raises(type(exc)), atomic_dir(out) as work:
                (work / "half").write_text("x")
                raise exc
            assert list(tmp_path.iterdir()) == []  # also the folders made for it


def test_non_empty_target_refused_empty_accepted(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with atomic_dir(out) as work:  # an empty folder is a fine target
        (work / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(OutputError, match="not empty"), atomic_dir(out):
        pass
    assert [p.name for p in out.iterdir()] == ["a"]


def test_second_claim_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "run"
    work = claim_dir(out)
    with pytest.raises(OutputError, match="another run"):
        claim_dir(out)
    publish_dir(work, out)
    assert out.is_dir()


def test_killed_run_is_noticed_and_set_aside(tmp_path, caplog):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    leftover = outputs.partial_dir(out)
    leftover.mkdir()
    (leftover / outputs.OWNER_FILE).write_text(f"{dead.stdout.strip()} {os.uname().nodename}")
    (leftover / "metrics.jsonl").write_text("{}\n")
    work = claim_dir(out)
    assert "was killed" in caplog.text  # a warning: shown unless silenced
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".run.killed-")]
    assert len(kept) == 1 and (kept[0] / "metrics.jsonl").exists()  # nothing deleted
    publish_dir(work, out)


def test_old_unmarked_partial_folder_is_set_aside(tmp_path, caplog):
    out = tmp_path / "run"
    leftover = outputs.partial_dir(out)
    leftover.mkdir()
    with pytest.raises(OutputError, match="another run"):  # fresh: maybe just starting
        claim_dir(out)
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    publish_dir(claim_dir(out), out)
    assert "was killed" in caplog.text


def test_publish_race_keeps_the_losers_results(tmp_path):
    """Something filled the target while the run worked: the results move to a free name."""
    out = tmp_path / "run"
    work = claim_dir(out)
    (work / "summary.json").write_text("mine")
    out.mkdir()
    (out / "summary.json").write_text("theirs")
    with pytest.raises(OutputError, match="run-2"):
        publish_dir(work, out)
    assert (out / "summary.json").read_text() == "theirs"
    assert (tmp_path / "run-2" / "summary.json").read_text() == "mine"


def test_targets_under_or_as_files(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_dir(f)
    with pytest.raises(OutputError, match="which is a file"):
        claim_dir(f / "run")
    with pytest.raises(OutputError, match="is a folder"):
        with atomic_file(tmp_path):
            pass
    assert f.read_text() == "x"


def test_atomic_file_never_over_an_existing_file_or_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("input")
    with pytest.raises(OutputError, match="also an input"), atomic_file(src, [src]):
        pass
    with pytest.raises(OutputError, match="exists"), atomic_file(src):
        pass
    assert src.read_text() == "input"
    new = tmp_path / "new.jsonl"
    with atomic_file(new) as fh:
        fh.write("ok")
    assert new.read_text() == "ok" and mode(new) & 0o044
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "new.jsonl"]


def test_free_name(tmp_path):
    (tmp_path / "a.forget.jsonl").write_text("")
    (tmp_path / "a-2.forget.jsonl").write_text("")
    assert free_name(tmp_path / "a.forget.jsonl") == tmp_path / "a-3.forget.jsonl"
    assert free_name(tmp_path / "b") == tmp_path / "b"


def test_trainer_run_refuses_a_used_folder(tmp_path):
    """Trainer(...).run(dir) a second time into the same folder is refused before any work."""
    from fastunlearn.config import RunConfig
    from fastunlearn.trainer import Trainer

    (tmp_path / "summary.json").write_text("first run")
    with pytest.raises(OutputError, match="not empty"):
        Trainer(RunConfig()).run(tmp_path)
    assert (tmp_path / "summary.json").read_text() == "first run"
    check_fresh_dir(tmp_path / "new")  # a new folder is fine
