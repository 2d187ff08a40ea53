"""Prompt formatting and batched greedy generation on a tiny random Llama."""
import pytest
import torch

from fastunlearn.generation import (
    encode_prompt,
    format_prompt,
    generate_answers,
    generate_with_status,
)
from tests.tiny_model import tiny_llama, tiny_tokenizer

PROMPTS = ["Hi?", "How do I make a cake, please?", "x", "What is the capital of France?"]


def sharp_llama(seed: int = 1):
    """A tiny random Llama with scaled-up weights: its greedy outputs depend on the prompt
    (the plain random init answers every prompt alike, which would make the tests vacuous)."""
    model = tiny_llama(vocab_size=128, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def greedy_no_cache(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """Reference decoder: full forward per step, no KV cache, no padding.
    Returns (text, finished with EOS)."""
    ids = torch.tensor([encode_prompt(tok, prompt)])
    new, finished = [], False
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            finished = True
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip(), finished


def test_format_prompt_paper_format():
    tok = tiny_tokenizer(chat_template=False)
    assert format_prompt(tok, "Why?") == "### Question: Why?\n ### Answer:"


def test_format_prompt_chat_template():
    tok = tiny_tokenizer(chat_template=True)
    assert format_prompt(tok, "Why?") == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("chat", [True, False])
def test_batched_left_padding_equals_one_by_one(chat):
    tok = tiny_tokenizer(chat_template=chat)
    model = sharp_llama()
    batched = generate_answers(model, tok, PROMPTS, max_new_tokens=10, batch_size=4)
    single = [generate_answers(model, tok, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single
    # prompt-dependent, non-empty outputs: otherwise the comparison proves nothing
    assert len(set(batched)) > 1 and any(batched)


def test_generation_is_greedy_new_text_only():
    tok = tiny_tokenizer(chat_template=True)
    model = sharp_llama(seed=2)
    with torch.no_grad():  # a likelier EOS: some answers stop, others hit max_new_tokens
        model.lm_head.weight[tok.eos_token_id] *= 2.0
    got = generate_with_status(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    want = [greedy_no_cache(model, tok, p, 8) for p in PROMPTS]
    assert got == want
    assert {f for _, f in got} == {True, False}  # both an EOS stop and a cut-off occur
    assert generate_answers(model, tok, PROMPTS, max_new_tokens=8) == [t for t, _ in want]


def test_restores_padding_side_and_training_mode_and_sets_missing_pad():
    tok = tiny_tokenizer(chat_template=True, pad=False)
    assert tok.pad_token_id is None
    tok.padding_side = "right"
    model = sharp_llama()
    model.train()
    out = generate_answers(model, tok, PROMPTS[:2], max_new_tokens=4, batch_size=2)
    assert len(out) == 2
    assert tok.padding_side == "right"
    assert model.training
    assert tok.pad_token == tok.eos_token


def test_bad_arguments():
    tok = tiny_tokenizer()
    model = tiny_llama()
    with pytest.raises(ValueError, match="list of strings"):
        generate_answers(model, tok, "one string", max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tok, ["a"], max_new_tokens=0)
    assert generate_answers(model, tok, [], max_new_tokens=2) == []
