"""Prompt formatting and batched greedy generation.

Training rows (``fastunlearn.data.format_example``) and generation share
:func:`format_prompt` and :func:`encode_prompt`, so the model is trained on exactly the token
sequence it later sees when it answers.
"""
from __future__ import annotations

import torch

# The paper's plain-text format (Yao, Xu, Liu 2023, official script):
#   "### Question: {q}\n ### Answer: {a}"
# The prompt ends at "### Answer:"; the answer text is " {a}" (a leading space, so BPE
# tokenizers glue it to the first word exactly as in the one-string form).
PAPER_PROMPT = "### Question: {prompt}\n ### Answer:"
PAPER_ANSWER_PREFIX = " "


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a (non-empty) chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str) -> str:
    """Prompt text the model answers after.

    With a chat template: one user turn rendered as text with ``add_generation_prompt=True``
    (all turns of a multi-turn ``data_files.ChatPrompt``).
    Without one: the paper's ``"### Question: {prompt}\\n ### Answer:"``.

    >>> format_prompt(tok_without_template, "Hi?")
    '### Question: Hi?\\n ### Answer:'
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    turns = getattr(prompt, "messages", None)  # a multi-turn ChatPrompt
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            turns or [{"role": "user", "content": prompt}], tokenize=False,
            add_generation_prompt=True)
    if turns:
        raise ValueError("a multi-turn chat prompt needs a tokenizer with a chat template")
    return PAPER_PROMPT.format(prompt=prompt)


def answer_text(tokenizer, answer: str) -> str:
    """Answer text as it follows :func:`format_prompt` (a leading space in the paper format)."""
    if has_chat_template(tokenizer):
        return answer
    return PAPER_ANSWER_PREFIX + answer


def _add_special_tokens(tokenizer) -> bool:
    # A rendered chat template already holds its special tokens (BOS included when the
    # template wants one); the plain format lets the tokenizer add its usual BOS.
    return not has_chat_template(tokenizer)


def encode_prompt(tokenizer, prompt: str, suffix: str = "") -> list[int]:
    """Token ids of ``format_prompt(tokenizer, prompt) + suffix`` (list of int)."""
    text = format_prompt(tokenizer, prompt) + suffix
    ids = tokenizer(text, add_special_tokens=_add_special_tokens(tokenizer))["input_ids"]
    # Some tokenizers append EOS with add_special_tokens=True: a prompt must not end the text.
    eos = tokenizer.eos_token_id
    if not has_chat_template(tokenizer) and eos is not None and ids and ids[-1] == eos:
        ids = ids[:-1]
    return list(ids)


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token when it has none: EOS, else UNK. Never resizes the vocab.

    Padding is always masked (attention mask 0, label -100), so reusing EOS is safe.
    """
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise ValueError("tokenizer has no pad, eos or unk token to pad with")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    for e in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]):
        if e is not None and e not in ids:
            ids.append(int(e))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                     batch_size: int = 8, progress: bool = False,
                     desc: str = "generating") -> list[str]:
    """Greedy answers to ``prompts``, one string per prompt (new text only, stripped).

    See :func:`generate_with_status` (which also says whether each answer ended with EOS).

    >>> generate_answers(model, tok, ["What is 2+2?"], max_new_tokens=8)
    ['4']
    """
    return [text for text, _ in generate_with_status(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        progress=progress, desc=desc)]


@torch.no_grad()
def generate_with_status(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                         batch_size: int = 8, progress: bool = False,
                         desc: str = "generating") -> list[tuple[str, bool]]:
    """Greedy ``(answer, finished)`` per prompt: the new text (stripped) and whether the model
    ended it with EOS (False: cut off at ``max_new_tokens``).

    Batches of ``batch_size`` prompts are LEFT-padded (so every row's last prompt token sits at
    the same position and the KV cache decodes them together); the tokenizer's
    ``padding_side`` and the model's training mode are restored afterwards. A missing pad
    token is set to EOS (:func:`ensure_pad_token`). Input ids: (B, T) int64 on the model's
    device; the result is decoded with ``skip_special_tokens=True``.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        return []
    from transformers import GenerationConfig

    ensure_pad_token(tokenizer)
    device = _model_device(model)
    eos_ids = _eos_ids(model, tokenizer)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids or None)

    was_training = model.training
    old_side = tokenizer.padding_side
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    answers: list[tuple[str, bool]] = []
    try:
        tokenizer.padding_side = "left"
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            # Encode each prompt exactly as the training rows do, then left-pad by hand.
            encoded = [encode_prompt(tokenizer, p) for p in chunk]
            t = max(len(e) for e in encoded)
            ids = torch.full((len(chunk), t), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            for i, e in enumerate(encoded):
                if e:
                    ids[i, t - len(e):] = torch.tensor(e, dtype=torch.long)
                    mask[i, t - len(e):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen_cfg)
            new = out[:, t:].cpu()
            for row in new.tolist():
                finished = any(x in eos_ids for x in row)
                answers.append((tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
        if bar is not None:
            bar.close()
    return answers
