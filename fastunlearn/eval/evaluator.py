"""``Evaluator``: the paper's metrics on a recipe's held-out data, before / during / after.

One ``run(model, step)`` call returns a flat dict of numbers (None where a metric cannot be
computed, e.g. harmful_rate without a judge) plus ``"samples"``: a few
``{"kind", "prompt", "answer"}`` generations for the report.

Metric names (all rates are fractions in [0, 1]):
  forget_nll, forget_ppl          mean per-token NLL / perplexity of held-out forget answers
  normal_kl                       mean per-token KL(ref || cur) on held-out normal answers
  normal_nll                      mean per-token NLL of held-out normal answers
  harmful_rate, harmful_score     judge verdicts / mean probability on the harmful evaluation
                                  prompts (HarmBench validation behaviours for the harmful
                                  recipe, else the held-out forget prompts)
  refusal_rate                    refusal phrases in the answers to those prompts
  harmful_rate_forget, harmful_score_forget, refusal_rate_forget
                                  the same on the run's own held-out forget prompts (when the
                                  harmful evaluation prompts are another set)
  normal_similarity_cosine        MiniLM cosine of normal answers vs the original model's
  normal_rouge_l                  ROUGE-L F1 of normal answers vs the original model's
  xstest_over_refusal             refusals on XSTest's safe prompts
  degenerate_rate_{harmful,normal}, distinct_{1,2}_{harmful,normal}, answer_words_{...}
  leak_rouge_l_{forget,keep}, bleu_{forget,keep}      (copyright recipe)
  halu_prefer_hallucinated        HaluEval: hallucinated answer more likely (mean log-prob)
  halu_generate_hallucinated      HaluEval: greedy answer holds more of the hallucinated
  halu_generate_right             answer's new words than of the right one's (and vice versa)
  eval_seconds
  eval_data                       (a dict) which prompt sets were used, and how many
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from . import likelihood
from .refusal import refusal_rate
from .text_metrics import bleu, degenerate_rate, distinct_n, rouge_l, words


@dataclass
class EvalConfig:
    """Evaluation settings (CLI flags of ``fastunlearn eval`` and the ``eval`` config block)."""

    max_new_tokens: int = 48
    batch_size: int = 8
    n_harmful: int = 16
    n_normal: int = 16
    n_xstest: int = 16
    judge: str = "builtin"  # "builtin" | "none" | path to an HF sequence-classification dir
    judge_harmful_labels: list[str] = field(default_factory=list)
    samples: int = 4
    generate: bool = True   # False: likelihood metrics only (fast tests)
    max_length: int = 256
    n_likelihood: int = 64  # held-out pairs used for forget_nll / normal_kl / normal_nll

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_harmful", "n_normal", "n_xstest", "samples", "n_likelihood"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        from .judge import check_judge_spec

        check_judge_spec(self.judge)  # a missing judge fails here, before any model loads


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _answer_recall(generated: str, answer: str, question: str) -> float:
    """Fraction of the answer's own words (those not already in the question, so restating
    the question earns nothing) that occur in ``generated``; 0.0 if the answer has none."""
    q = set(words(question))
    content = {w for w in words(answer) if w not in q and w.isalnum()}
    if not content:
        return 0.0
    return len(content & set(words(generated))) / len(content)


def _split_passage(text: str, n_ref_words: int) -> tuple[str, str] | None:
    """A passage -> (prefix shown to the model, true continuation of ``n_ref_words`` words)."""
    ws = text.split()
    if len(ws) < 8:
        return None
    cut = max(4, min(len(ws) // 2, 64))
    return " ".join(ws[:cut]), " ".join(ws[cut:cut + n_ref_words])


class Evaluator:
    """Runs the evaluation of one recipe; caches the original model's normal answers.

    ``reference_model``: the original (frozen) model; used for normal_kl and the original
    normal answers. Without it the model as first evaluated serves as the reference: normal_kl
    is measured against a snapshot of that first state, and the first call's answers become
    the originals. A reference that is about to be freed (a cached reference in training) is
    kept as such a snapshot by :meth:`snapshot_reference`.

    Prompt sets: ``harmful_rate`` uses ``extra["harmful_eval_prompts"]`` (HarmBench for the
    harmful recipe) when present, else the held-out forget prompts; with the former, the
    held-out forget prompts get their own ``harmful_rate_forget``.
    """

    def __init__(self, tokenizer, data, cfg: EvalConfig | None = None, *, reference_model=None,
                 progress: bool = True):
        self.tok, self.data = tokenizer, data
        self.cfg = cfg or EvalConfig()
        self.ref = reference_model
        self.progress = progress
        extra = dict(getattr(data, "extra", None) or {})
        c = self.cfg
        heldout_forget = [p.prompt for p in data.heldout_forget][:c.n_harmful]
        harmful = list(extra.get("harmful_eval_prompts") or [])[:c.n_harmful]
        self.harmful_set = "HarmBench validation behaviours" if harmful else \
            "held-out forget prompts"
        self.harmful_prompts = harmful or heldout_forget
        # The run's own held-out forget prompts, when harmful_rate uses another set.
        self.forget_prompts = heldout_forget if harmful else []
        self.normal_prompts = [p.prompt for p in data.heldout_normal][:c.n_normal]
        self.xstest_prompts = list(extra.get("xstest_safe") or [])[:c.n_xstest]
        self.forget_pairs = [p for p in data.heldout_forget if p.answer.strip()][:c.n_likelihood]
        self.normal_pairs = [p for p in data.heldout_normal if p.answer.strip()][:c.n_likelihood]
        n_ref = max(4, int(0.75 * c.max_new_tokens))
        self.book = {}
        for which in ("forget", "keep"):
            split = [_split_passage(t, n_ref) for t in extra.get(f"book_{which}_heldout") or []]
            self.book[which] = [s for s in split if s][:c.n_harmful]
        self.halu = [h for h in extra.get("halueval") or []
                     if all(h.get(k) for k in ("question", "right_answer", "hallucinated_answer"))
                     ][:c.n_harmful]
        self._judge = None
        self._judge_loaded = False
        self._original_normal: list[str] | None = None
        self._ref_snapshot: dict | None = None
        self._model_is_reference = False

    # ------------------------------------------------------------------ helpers
    @property
    def judge(self):
        if not self._judge_loaded:
            from .judge import load_judge

            # A user judge that cannot load raises (JudgeError); only the builtin judge
            # without its optional MiniLM package degrades to None, with a warning.
            self._judge = load_judge(self.cfg.judge, self.cfg.judge_harmful_labels)
            self._judge_loaded = True
        return self._judge

    def describe(self) -> dict:
        """Which prompt / pair sets each metric uses, with their sizes (for the report)."""
        d = {"harmful_rate": f"{self.harmful_set} ({len(self.harmful_prompts)})",
             "forget_nll": f"held-out forget pairs ({len(self.forget_pairs)})",
             "normal_kl": f"held-out normal pairs ({len(self.normal_pairs)})",
             "normal_rouge_l": f"held-out normal prompts ({len(self.normal_prompts)})",
             "xstest_over_refusal": f"XSTest safe prompts ({len(self.xstest_prompts)})"}
        if self.forget_prompts:
            d["harmful_rate_forget"] = f"held-out forget prompts ({len(self.forget_prompts)})"
        return d

    def snapshot_reference(self) -> None:
        """Keep what evaluation needs of the reference model (its normal_kl inputs and its
        original normal answers), then drop the model, so it can be freed."""
        if self.ref is None:
            return
        c = self.cfg
        was_training = self.ref.training
        self.ref.eval()
        try:
            if self.normal_pairs:
                self._ref_snapshot = likelihood.reference_snapshot(
                    self.ref, self.tok, self.normal_pairs, max_length=c.max_length,
                    batch_size=c.batch_size)
            if c.generate:
                self.original_normal_answers(self.ref)
        finally:
            self.ref.train(was_training)
        self.ref = None

    def _gen(self, model, prompts, desc):
        from fastunlearn.generation import generate_answers

        if not prompts:
            return []
        return generate_answers(model, self.tok, prompts, max_new_tokens=self.cfg.max_new_tokens,
                                batch_size=self.cfg.batch_size, progress=self.progress, desc=desc)

    def original_normal_answers(self, model) -> list[str]:
        """Greedy answers of the original model to the normal prompts (computed once)."""
        if self._original_normal is None:
            src = self.ref if self.ref is not None else model
            self._original_normal = self._gen(src, self.normal_prompts, "original answers")
        return self._original_normal

    # ------------------------------------------------------------------ metrics
    def _likelihood_metrics(self, model) -> dict:
        c, m = self.cfg, {}
        if self.forget_pairs:
            rows = likelihood.answer_nll(model, self.tok, self.forget_pairs,
                                         max_length=c.max_length, batch_size=c.batch_size)
            n = sum(k for _, k in rows)
            nll = sum(s for s, _ in rows) / max(n, 1)
            m["forget_nll"] = nll
            m["forget_ppl"] = math.exp(min(nll, 700.0))  # exp overflows past ~709
        else:
            m["forget_nll"] = m["forget_ppl"] = None
        if self.normal_pairs:
            rows = likelihood.answer_nll(model, self.tok, self.normal_pairs,
                                         max_length=c.max_length, batch_size=c.batch_size)
            m["normal_nll"] = sum(s for s, _ in rows) / max(sum(k for _, k in rows), 1)
            kw = dict(max_length=c.max_length, batch_size=c.batch_size)
            if self.ref is not None and self.ref is not model:
                s, n = likelihood.answer_kl(model, self.ref, self.tok, self.normal_pairs, **kw)
                m["normal_kl"] = s / max(n, 1)
            elif self.ref is None:
                # No reference model (e.g. a cached reference in training): the model as first
                # evaluated is the reference; keep what the KL needs of it, not the model.
                if self._ref_snapshot is None:
                    self._ref_snapshot = likelihood.reference_snapshot(
                        model, self.tok, self.normal_pairs, **kw)
                s, n = likelihood.answer_kl_to_snapshot(model, self.tok, self.normal_pairs,
                                                        self._ref_snapshot, **kw)
                m["normal_kl"] = s / max(n, 1)
            else:
                m["normal_kl"] = 0.0
        else:
            m["normal_nll"] = None
            m["normal_kl"] = 0.0
        return m

    def _text_metrics(self, kind: str, answers: list[str]) -> dict:
        return {
            f"degenerate_rate_{kind}": degenerate_rate(answers) if answers else None,
            f"distinct_1_{kind}": distinct_n(answers, 1) if answers else None,
            f"distinct_2_{kind}": distinct_n(answers, 2) if answers else None,
            f"answer_words_{kind}": _mean(len(words(a)) for a in answers),
        }

    def _harm_metrics(self, prompts: list[str], answers: list[str], suffix: str) -> dict:
        judge = self.judge if answers else None
        m = {f"harmful_rate{suffix}": None, f"harmful_score{suffix}": None}
        if judge is not None:
            probs = judge.predict_proba(prompts, answers)
            m[f"harmful_rate{suffix}"] = _mean(float(p >= judge.threshold) for p in probs)
            m[f"harmful_score{suffix}"] = _mean(probs)
        m[f"refusal_rate{suffix}"] = refusal_rate(answers) if answers else None
        return m

    def _generation_metrics(self, model) -> tuple[dict, list[dict]]:
        m, samples = {}, []
        harm = self._gen(model, self.harmful_prompts, "harmful prompts")
        m.update(self._harm_metrics(self.harmful_prompts, harm, ""))
        m.update(self._text_metrics("harmful", harm))
        forget = self._gen(model, self.forget_prompts, "held-out forget prompts")
        if forget:
            m.update(self._harm_metrics(self.forget_prompts, forget, "_forget"))

        normal = self._gen(model, self.normal_prompts, "normal prompts")
        if (self.ref is None or self._model_is_reference) and self._original_normal is None:
            self._original_normal = list(normal)  # these answers are the originals
        orig = self.original_normal_answers(model) if normal else []
        m["normal_rouge_l"] = _mean(rouge_l(a, o) for a, o in zip(normal, orig))
        m["normal_similarity_cosine"] = None
        if normal:
            from .embeddings import cosine_pairs, get_embedder

            emb = get_embedder(warn=False)
            if emb is not None:
                cos = cosine_pairs(emb.embed(normal), emb.embed(orig))
                m["normal_similarity_cosine"] = float(cos.clamp(-1.0, 1.0).mean())
        m.update(self._text_metrics("normal", normal))

        xs = self._gen(model, self.xstest_prompts, "xstest safe prompts")
        m["xstest_over_refusal"] = refusal_rate(xs) if xs else None

        k = self.cfg.samples
        for kind, prompts, answers in (("harmful", self.harmful_prompts, harm),
                                       ("forget", self.forget_prompts, forget),
                                       ("normal", self.normal_prompts, normal),
                                       ("xstest", self.xstest_prompts, xs)):
            samples += [dict(kind=kind, prompt=p, answer=a)
                        for p, a in list(zip(prompts, answers))[:k]]

        for which in ("forget", "keep"):
            parts = self.book[which]
            if parts:
                cont = self._gen(model, [p for p, _ in parts], f"book {which}")
                m[f"leak_rouge_l_{which}"] = _mean(rouge_l(c, t) for c, (_, t) in zip(cont, parts))
                m[f"bleu_{which}"] = _mean(bleu(c, t) for c, (_, t) in zip(cont, parts))
                samples += [dict(kind=f"book_{which}", prompt=p, answer=c)
                            for (p, _), c in list(zip(parts, cont))[:k]]
        if self.halu:
            qs = [h["question"] for h in self.halu]
            gen = self._gen(model, qs, "halueval")
            scores = [(_answer_recall(g, h["hallucinated_answer"], h["question"]),
                       _answer_recall(g, h["right_answer"], h["question"]))
                      for g, h in zip(gen, self.halu)]
            m["halu_generate_hallucinated"] = _mean(float(a > b) for a, b in scores)
            m["halu_generate_right"] = _mean(float(b > a) for a, b in scores)
            samples += [dict(kind="halueval", prompt=q, answer=g)
                        for q, g in list(zip(qs, gen))[:k]]
        return m, samples

    def _halu_preference(self, model) -> dict:
        if not self.halu:
            return {}
        c = self.cfg
        right = likelihood.answer_logprob(
            model, self.tok, [(h["question"], h["right_answer"]) for h in self.halu],
            max_length=c.max_length, batch_size=c.batch_size)
        hall = likelihood.answer_logprob(
            model, self.tok, [(h["question"], h["hallucinated_answer"]) for h in self.halu],
            max_length=c.max_length, batch_size=c.batch_size)
        return {"halu_prefer_hallucinated": _mean(float(b > a) for a, b in zip(right, hall))}

    def run(self, model, step: int, *, model_is_reference: bool = False) -> dict:
        """All metrics of ``model`` at training ``step``; restores its train/eval mode.

        ``model_is_reference``: the model still equals the reference (before the first step), so
        its normal answers serve as the original answers without generating them twice."""
        t0 = time.perf_counter()
        self._model_is_reference = model_is_reference
        was_training = model.training
        ref_training = self.ref.training if self.ref is not None else False
        model.eval()
        if self.ref is not None:
            self.ref.eval()
        try:
            metrics: dict = {"step": int(step)}
            metrics.update(self._likelihood_metrics(model))
            metrics.update(self._halu_preference(model))
            samples: list[dict] = []
            if self.cfg.generate:
                gm, samples = self._generation_metrics(model)
                metrics.update(gm)
            metrics["eval_seconds"] = time.perf_counter() - t0
            metrics["eval_data"] = self.describe()
            metrics["samples"] = samples
            return metrics
        finally:
            # The reference may wrap the policy (LoRA adapters disabled): restore it first so
            # the policy ends in its own original mode.
            if self.ref is not None:
                self.ref.train(ref_training)
            model.train(was_training)
