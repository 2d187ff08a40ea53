"""Likelihood metrics from full model logits (evaluation only: small batches, no grad).

Examples are tokenized by ``fastunlearn.data.format_example`` (the training format: prompt
ids labelled -100, answer ids + EOS labelled), right-padded, and run through
``model(input_ids=(B, T) int64, attention_mask=(B, T) int64).logits`` -> (B, T, V) on the
model's device; position t predicts label t + 1. All statistics are accumulated in fp32/fp64
whatever the model dtype.

* ``answer_nll``: per-example summed NLL and answer-token count (pool them for the mean
  per-token NLL, the ``forget_nll`` metric).
* ``answer_kl``: summed KL(p_ref || p_cur) over answer tokens and the count (``normal_kl``).
* ``answer_logprob``: mean per-token log-likelihood of each answer (HaluEval preference).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _pairs(pairs: Iterable) -> list[tuple[str, str, bool]]:
    """(prompt, answer, complete): a cut-off answer (complete=False) gets no EOS token."""
    out = []
    for p in pairs:
        if isinstance(p, (tuple, list)):
            out.append((str(p[0]), str(p[1]), True))
        else:
            out.append((p.prompt, p.answer, bool(getattr(p, "complete", True))))
    return out


def encode_pairs(tokenizer, pairs, *, max_length: int) -> list[tuple[list[int], list[int]]]:
    """``format_example`` over ``pairs`` (Pair or (prompt, answer)); pairs that cannot be
    encoded (empty answer...) are a ValueError naming their index."""
    from fastunlearn.data import format_example

    rows = []
    for i, (prompt, answer, complete) in enumerate(_pairs(pairs)):
        try:
            rows.append(format_example(tokenizer, prompt, answer, max_length=max_length,
                                       add_eos=complete))
        except ValueError as e:
            raise ValueError(f"eval pair {i}: {e}") from None
    return rows


def _batches(rows, batch_size: int, pad_id: int):
    """Yield (input_ids, attention_mask, labels), each (b, T) int64 on CPU, right-padded."""
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        t = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        labels = torch.full((len(chunk), t), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(chunk):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
            labels[i, :len(y)] = torch.tensor(y)
        yield ids, mask, labels


def _logits(model, ids, mask) -> torch.Tensor:
    dev = _device(model)
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits


def _pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


@torch.no_grad()
def answer_nll(model, tokenizer, pairs, *, max_length: int = 256,
               batch_size: int = 8) -> list[tuple[float, int]]:
    """Per example: (sum over answer tokens of -log p(y_t | y_<t), number of answer tokens).

    ``sum(s) / sum(n)`` is the mean per-token NLL (nats); ``exp`` of it the perplexity.
    """
    rows = encode_pairs(tokenizer, pairs, max_length=max_length)
    out: list[tuple[float, int]] = []
    for ids, mask, labels in _batches(rows, batch_size, _pad_id(tokenizer)):
        logits = _logits(model, ids, mask)[:, :-1].float()  # (b, T-1, V)
        tgt = labels[:, 1:].to(logits.device)               # (b, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), tgt.clamp_min(0), reduction="none")
        valid = tgt != IGNORE_INDEX
        nll = (nll * valid).double()
        out.extend(zip(nll.sum(1).tolist(), valid.sum(1).tolist()))
    return out


@torch.no_grad()
def answer_logprob(model, tokenizer, pairs, *, max_length: int = 256,
                   batch_size: int = 8) -> list[float]:
    """Mean per-token log-likelihood of each answer given its prompt (length-normalised, so
    a short answer is not preferred merely for being short)."""
    return [-s / max(n, 1) for s, n in answer_nll(model, tokenizer, pairs,
                                                  max_length=max_length, batch_size=batch_size)]


@torch.no_grad()
def answer_kl(model, ref_model, tokenizer, pairs, *, max_length: int = 256,
              batch_size: int = 8) -> tuple[float, int]:
    """(sum over answer tokens of KL(p_ref || p_cur), number of answer tokens).

    Both models see the same ids; the reference's logits are moved to the current model's
    device. KL is computed from fp32 log-softmaxes, so it is 0 up to rounding when the two
    models are the same.
    """
    rows = encode_pairs(tokenizer, pairs, max_length=max_length)
    total, count = 0.0, 0
    for ids, mask, labels in _batches(rows, batch_size, _pad_id(tokenizer)):
        cur = _logits(model, ids, mask)[:, :-1].float()
        ref = _logits(ref_model, ids, mask)[:, :-1].to(cur.device).float()
        valid = (labels[:, 1:] != IGNORE_INDEX).to(cur.device)
        total += _kl_sum(ref[valid], cur[valid])
        count += int(valid.sum())
    return total, count


def _kl_sum(ref_logits: torch.Tensor, cur_logits: torch.Tensor) -> float:
    """Sum over rows of KL(softmax(ref) || softmax(cur)), from fp32 (N, V) logits."""
    lp_cur = cur_logits.log_softmax(-1)
    lp_ref = ref_logits.log_softmax(-1)
    return float((lp_ref.exp() * (lp_ref - lp_cur)).sum(-1).double().sum())


@torch.no_grad()
def reference_snapshot(model, tokenizer, pairs, *, max_length: int = 256,
                       batch_size: int = 8) -> dict:
    """What ``answer_kl`` needs of a reference, kept without the reference model: its trunk's
    hidden states at the answer positions (N, H) and a copy of its head (with its logit scale
    and soft-cap). Exact (fp32 logits are recomputed from them); about N x H + V x H numbers
    instead of a whole model."""
    from fastunlearn.models import head_of, trunk_of

    rows = encode_pairs(tokenizer, pairs, max_length=max_length)
    hidden = []
    for ids, mask, labels in _batches(rows, batch_size, _pad_id(tokenizer)):
        dev = _device(model)
        h = trunk_of(model)(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
        valid = (labels[:, 1:] != IGNORE_INDEX).to(dev)
        hidden.append(h[:, :-1][valid].float().cpu())
    head = head_of(model)
    return {"hidden": hidden, "weight": head.weight.detach().float().cpu().clone(),
            "bias": None if head.bias is None else head.bias.detach().float().cpu().clone(),
            "softcap": head.softcap, "logit_scale": float(getattr(head, "logit_scale", 1.0))}


@torch.no_grad()
def answer_kl_to_snapshot(model, tokenizer, pairs, snapshot: dict, *, max_length: int = 256,
                          batch_size: int = 8) -> tuple[float, int]:
    """``answer_kl`` against a ``reference_snapshot`` of the same pairs and settings."""
    from fastunlearn.losses.reference import logits_ref

    rows = encode_pairs(tokenizer, pairs, max_length=max_length)
    total, count = 0.0, 0
    batches = _batches(rows, batch_size, _pad_id(tokenizer))
    for (ids, mask, labels), ref_h in zip(batches, snapshot["hidden"], strict=True):
        cur = _logits(model, ids, mask)[:, :-1].float()
        valid = (labels[:, 1:] != IGNORE_INDEX).to(cur.device)
        bias = snapshot["bias"]
        ref = logits_ref(ref_h.to(cur.device), snapshot["weight"].to(cur.device),
                         None if bias is None else bias.to(cur.device),
                         snapshot["softcap"] or None, None, snapshot.get("logit_scale", 1.0))
        total += _kl_sum(ref, cur[valid])
        count += int(valid.sum())
    return total, count
