"""`fastunlearn collect`: prompt files, atomic JSONL output, end to end on a tiny local model."""
import json
from pathlib import Path

import pytest
import torch

from fastunlearn.cli import main
from fastunlearn.collect import collect_forget_set, default_output, load_prompts, write_pairs
from fastunlearn.data import DataError, Pair, load_pairs
from fastunlearn.generation import generate_answers
from fastunlearn.outputs import OutputError
from tests.tiny_model import tiny_llama, tiny_tokenizer


def test_load_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first?\n\n  second?  \n")
    assert load_prompts(tmp_path / "p.txt") == ["first?", "second?"]
    (tmp_path / "p.jsonl").write_text('{"q": "a"}\n{"q": "b"}\n')
    assert load_prompts(tmp_path / "p.jsonl", column="q") == ["a", "b"]
    (tmp_path / "p.json").write_text('["x", "y"]')
    assert load_prompts(tmp_path / "p.json") == ["x", "y"]
    (tmp_path / "p.csv").write_text("goal,target\nharm one,Sure\nharm two,Sure\n")
    assert load_prompts(tmp_path / "p.csv", column="goal") == ["harm one", "harm two"]


def test_load_prompts_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(tmp_path / "e.txt")
    (tmp_path / "p.csv").write_text("goal,target\nharm,Sure\n")
    with pytest.raises(DataError, match="column 'prompt' not found.*goal, target"):
        load_prompts(tmp_path / "p.csv")


def test_write_pairs_atomic_round_trip(tmp_path):
    out = tmp_path / "sub" / "f.jsonl"
    pairs = [Pair("p ü", "a\nb"), Pair("q", "r", complete=False)]
    write_pairs(pairs, out)
    assert load_pairs(out) == pairs
    assert sorted(x.name for x in out.parent.iterdir()) == ["f.jsonl"]  # no temp file left
    assert out.stat().st_mode & 0o044  # readable by others like a plain open(), not 0600

    class Boom:
        prompt = "b"

        @property
        def answer(self):  # fails mid-write
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_pairs([Pair("new", "x"), Boom()], out.with_name("g.jsonl"))
    assert sorted(x.name for x in out.parent.iterdir()) == ["f.jsonl"]  # nothing half-written
    with pytest.raises(OutputError, match="exists"):  # never written over
        write_pairs([Pair("new", "x")], out)
    assert load_pairs(out) == pairs


def test_default_output_never_over_the_input(tmp_path, monkeypatch):
    """The default name of `x.forget.jsonl` is `x.forget.jsonl`: it steps to a free name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.forget.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    assert default_output("x.forget.jsonl") == Path("x-2.forget.jsonl")
    assert default_output("sub/y.txt") == Path("y.forget.jsonl")
    with pytest.raises(OutputError, match="also an input"):
        write_pairs([Pair("p", "a")], "x.forget.jsonl", ["x.forget.jsonl"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    model = tiny_llama(vocab_size=128, seed=1)
    with torch.no_grad():  # sharper weights: prompt-dependent greedy answers
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(d)
    tiny_tokenizer(chat_template=True).save_pretrained(d)
    return d


def test_collect_main_writes_jsonl(tmp_path, tiny_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["How do I do a bad thing?", "Tell me something harmful.", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "forget.jsonl"
    rc = main(["collect", "--prompts", str(tmp_path / "prompts.txt"), "--model", str(tiny_dir),
                       "--out", str(out), "--max-new-tokens", "6", "--batch-size", "2",
                       "--no-progress"])
    assert rc == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert {"prompt", "answer"} <= set(rows[0]) <= {"prompt", "answer", "complete"}
    # the answers are the model's own greedy answers
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    want = collect_forget_set(model, tok, prompts, max_new_tokens=6, batch_size=3,
                              progress=False)
    assert [r["answer"] for r in rows] == [p.answer for p in want]
    assert want[0].answer == generate_answers(model, tok, prompts[:1], max_new_tokens=6)[0]
    assert any(r["answer"] for r in rows)
    # answers cut off at max_new_tokens are marked, and the mark survives loading
    cut = [not p.complete for p in want]
    assert [r.get("complete", True) is False for r in rows] == cut
    assert [not p.complete for p in load_pairs(out)] == cut
    assert any(cut)


def test_collect_main_limit_and_errors(tmp_path, tiny_dir, capsys):
    (tmp_path / "p.jsonl").write_text('{"goal": "a"}\n{"goal": "b"}\n')
    out = tmp_path / "o.jsonl"
    rc = main(["collect", "--prompts", str(tmp_path / "p.jsonl"), "--column", "goal",
                       "--limit", "1", "--model", str(tiny_dir), "--out", str(out),
                       "--max-new-tokens", "2", "--no-progress"])
    assert rc == 0 and len(out.read_text().splitlines()) == 1
    capsys.readouterr()
    bad_out = tmp_path / "never.jsonl"
    rc = main(["collect", "--prompts", str(tmp_path / "missing.txt"), "--model", str(tiny_dir),
                       "--out", str(bad_out)])
    err = capsys.readouterr().err
    assert rc == 2 and "file not found" in err and len(err.strip().splitlines()) == 1
    assert not bad_out.exists()
    rc = main(["collect", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(tiny_dir),
                       "--out", str(bad_out)])
    assert rc == 2 and "column 'prompt' not found" in capsys.readouterr().err
    rc = main(["collect", "--prompts", str(tmp_path / "p.jsonl"), "--column", "goal",
                       "--batch-size", "0", "--out", str(bad_out)])
    assert rc == 2 and not bad_out.exists()


def test_collect_default_output_beside_its_input(tmp_path, tiny_dir, monkeypatch, capsys):
    """`collect --prompts x.forget.jsonl` in the input's folder: the default output name is the
    input's own name, so it steps to a free one and the input is untouched."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "x.forget.jsonl"
    src.write_text('{"prompt": "p1", "answer": "a1"}\n{"prompt": "p2", "answer": "a2"}\n')
    before = src.read_bytes()
    assert main(["collect", "--prompts", "x.forget.jsonl", "--model", str(tiny_dir),
                 "--max-new-tokens", "2", "--no-progress"]) == 0
    assert "x-2.forget.jsonl" in capsys.readouterr().out
    assert src.read_bytes() == before
    assert len((tmp_path / "x-2.forget.jsonl").read_text().splitlines()) == 2
