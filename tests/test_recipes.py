"""The bundled recipes and their registry: held-out splits, seeds, caps, extras."""
import pytest

from fastunlearn.data_files import DataError
from fastunlearn.recipes import load_recipe, recipe_names


def test_recipe_names_and_unknown():
    assert recipe_names()[0] == "harmful"
    assert set(recipe_names()) == {"harmful", "copyright", "hallucination"}
    with pytest.raises(DataError, match="unknown recipe 'nope'.*harmful, copyright, hallucination"):
        load_recipe("nope")
    with pytest.raises(DataError, match="unknown harmful forget source"):
        load_recipe("harmful:nope")


def _prompts(pairs):
    return {" ".join(p.prompt.lower().split()) for p in pairs}


@pytest.mark.parametrize("name", ["harmful", "harmful:jbb", "harmful:hh", "copyright",
                                  "hallucination"])
def test_recipe_heldout_disjoint_from_training(name):
    r = load_recipe(name, seed=3, n_heldout=8)
    assert len(r.heldout_forget) == 8 and len(r.heldout_normal) == 8
    assert r.forget and r.normal and r.sources
    train = _prompts(r.forget) | _prompts(r.normal)
    assert not (_prompts(r.heldout_forget) & train)
    assert not (_prompts(r.heldout_normal) & train)
    assert all(p.answer.strip() for p in r.forget + r.normal)


def test_recipe_seeded_and_caps():
    a = load_recipe("harmful", seed=0, n_forget=10, n_normal=12, n_heldout=4)
    b = load_recipe("harmful", seed=0, n_forget=10, n_normal=12, n_heldout=4)
    c = load_recipe("harmful", seed=1, n_forget=10, n_normal=12, n_heldout=4)
    full = load_recipe("harmful", seed=0, n_heldout=4)
    assert a == b
    assert a.heldout_forget != c.heldout_forget
    assert len(a.forget) == 10 and len(a.normal) == 12
    assert a.heldout_forget == full.heldout_forget  # caps never move the held-out split
    assert a.forget == full.forget[:10]


def test_recipe_extras():
    from fastunlearn.recipes.harmful import is_refusal

    h = load_recipe("harmful")
    assert h.extra["forget_source"] == "self" and len(h.forget) > 200
    assert not any(is_refusal(p.answer) for p in h.forget + h.heldout_forget)
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert len(h.extra["xstest_safe"]) == 250
    assert len(h.extra["harmful_eval_prompts"]) > 20
    c = load_recipe("copyright", n_heldout=4)
    forget_text = " ".join(f"{p.prompt} {p.answer}" for p in c.forget)
    assert len(c.extra["book_forget_heldout"]) == 4
    assert all(s not in forget_text for s in c.extra["book_forget_heldout"])
    assert "Gutenberg" not in forget_text  # header / footer stripped
    assert not any(p.complete for p in c.forget)  # windows stop mid-text: no EOS
    hal = load_recipe("hallucination", n_heldout=5)
    assert len(hal.extra["halueval"]) == 5
    assert {"question", "knowledge", "right_answer", "hallucinated_answer"} <= set(
        hal.extra["halueval"][0])
    assert [p.answer for p in hal.heldout_forget] == [
        it["hallucinated_answer"] for it in hal.extra["halueval"]]


def test_recipe_bad_sizes():
    with pytest.raises(DataError, match="n_heldout"):
        load_recipe("harmful", n_heldout=0)
    with pytest.raises(DataError, match="leaves nothing to train"):
        load_recipe("harmful:jbb", n_heldout=10_000)


def test_recipes_do_not_import_the_tokenisation_module():
    """fastunlearn.recipes reads files through data_files; data.py imports recipes, never the
    other way round."""
    import subprocess
    import sys

    code = ("import sys, fastunlearn.recipes as r; r.load_recipe('harmful', n_heldout=2); "
            "r.load_recipe('copyright', n_heldout=2); r.load_recipe('hallucination', n_heldout=2); "
            "print('fastunlearn.data' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
