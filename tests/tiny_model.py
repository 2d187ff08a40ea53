"""Tiny offline tokenizer and random Llama for tests (no download)."""
from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII plus chat special tokens."""
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=["<|im_start|>", "</s>"])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int = 128, seed: int = 0, tie: bool = True, hidden: int = 32,
               layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie, pad_token_id=1,
                      bos_token_id=2, eos_token_id=5)
    return LlamaForCausalLM(cfg).eval()


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def tiny_opt(vocab_size: int = 128, seed: int = 0, attn: str = "sdpa", dropout: float = 0.0):
    """OPT: learned positions offset by 2, biased head-less layers, optional dropout."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=32,
                    dropout=dropout, attention_dropout=dropout, pad_token_id=1, bos_token_id=2,
                    eos_token_id=5, attn_implementation=attn)
    return _seeded(seed, lambda: OPTForCausalLM(cfg))


def tiny_bloom(vocab_size: int = 128, seed: int = 0, attn: str = "eager"):
    """BLOOM: ALiBi position bias built from a 2-D attention mask."""
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4,
                      pad_token_id=1, bos_token_id=2, eos_token_id=5, attn_implementation=attn)
    return _seeded(seed, lambda: BloomForCausalLM(cfg))


def tiny_granite(vocab_size: int = 128, seed: int = 0, logits_scaling: float = 8.0):
    """Granite: logits divided by ``logits_scaling`` after the head."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, logits_scaling=logits_scaling,
                        pad_token_id=1, bos_token_id=2, eos_token_id=5)
    return _seeded(seed, lambda: GraniteForCausalLM(cfg))


def write_jsonl(path, rows):
    """``rows`` (dicts) as JSON lines at ``path``; returns the path."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tiny_run_inputs(d):
    """A tiny model folder and forget / normal JSONL files (10 rows each) in ``d``."""
    tiny_llama(128, seed=0).save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    write_jsonl(d / "forget.jsonl", [{"prompt": f"bad request {i}", "answer": f"bad answer {i}"}
                                     for i in range(10)])
    write_jsonl(d / "normal.jsonl", [{"q": f"what is {i}?", "a": f"it is {i}."}
                                     for i in range(10)])
    return d
