"""Recipe "copyright": forget one public-domain book's passages, keep another's.

Passages are consecutive, non-overlapping word windows of the book text (Project Gutenberg
header and footer stripped): prompt = the first ``PROMPT_WORDS`` words, answer = the next
``ANSWER_WORDS`` words (its continuation).
"""
from __future__ import annotations

from ..data_files import DataError, Pair, read_text
from . import RecipeData
from ._common import SOURCES, cap, data_file, split_heldout

FORGET_BOOK = "alice_in_wonderland_pg11.txt.gz"
KEEP_BOOK = "pride_and_prejudice_pg1342.txt.gz"
PROMPT_WORDS = 32
ANSWER_WORDS = 64


def strip_gutenberg(text: str) -> str:
    """Body of a Project Gutenberg text: between the '*** START OF' and '*** END OF' lines."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("*** START OF")), None)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        raise DataError("book text has no Project Gutenberg START/END markers")
    return "\n".join(lines[start + 1:end]).strip()


def book_passages(name: str) -> list[Pair]:
    """(prefix, continuation) windows over a bundled book's words."""
    words = strip_gutenberg(read_text(data_file(name))).split()
    n = PROMPT_WORDS + ANSWER_WORDS
    # complete=False: a window stops mid-text, so no EOS is trained after it.
    return [Pair(" ".join(words[i:i + PROMPT_WORDS]), " ".join(words[i + PROMPT_WORDS:i + n]),
                 complete=False)
            for i in range(0, len(words) - n + 1, n)]


def build(*, seed: int, n_forget: int | None, n_normal: int | None,
          n_heldout: int) -> RecipeData:
    """Forget: Alice in Wonderland passages; normal: Pride and Prejudice passages. Held-out
    windows of both books never train; their full text is in ``extra["book_forget_heldout"]``
    / ``extra["book_keep_heldout"]`` for leak tests.
    """
    held_f, forget = split_heldout(book_passages(FORGET_BOOK), n_heldout, seed, "book-forget")
    held_k, keep = split_heldout(book_passages(KEEP_BOOK), n_heldout, seed, "book-keep")
    return RecipeData(
        name="copyright", forget=cap(forget, n_forget), normal=cap(keep, n_normal),
        heldout_forget=held_f, heldout_normal=held_k,
        extra={"book_forget_heldout": [f"{p.prompt} {p.answer}" for p in held_f],
               "book_keep_heldout": [f"{p.prompt} {p.answer}" for p in held_k],
               "book_forget_title": "Alice's Adventures in Wonderland",
               "book_keep_title": "Pride and Prejudice"},
        sources=[SOURCES[FORGET_BOOK], SOURCES[KEEP_BOOK]])
