"""Spelled input: a user's words each followed by their letters, "Reverse planet (p l a n e t)".

A word is one or two tokens to the model, and a small base model does not know the letters inside
them (bench/letter_words.py measures it), so no adapter over it can reverse, sort or shift a plain
word's letters. An adapter whose card says `"input": "spelled"` is trained on, and served with, its
users' messages in this form (input_forms.py registers it); it writes a plain word one token per
letter (the model cannot pick the multi-letter tokens that spell it either).
"""

from __future__ import annotations

import re

WORD = re.compile(r"[A-Za-z]{2,}")  # single letters are already one token each
# three or more single letters written apart ("p l a n", "p, l, a", "p-l-a"): the letters are in sight
LETTERS_APART = re.compile(r"\b[A-Za-z](?:[\s,;-]+[A-Za-z]\b){2,}")
LETTER_PIECES = re.compile(r" ?[A-Za-z]|[^A-Za-z]+")  # a letter (with its leading space), or a run of others


def spell_words(text: str) -> str:
    """'Reverse planet.' -> 'Reverse (R e v e r s e) planet (p l a n e t).' A text whose letters are
    already written apart stays as it is: the instruction's spelled words would only add letters
    that are not the input's (docs/decisions.md has the measurement)."""
    if LETTERS_APART.search(text):
        return text
    return WORD.sub(lambda m: f"{m[0]} ({' '.join(m[0])})", text)


def letter_token_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized one letter per token ("tenalp" -> t e n a l p): how a spelled-input adapter
    is trained to write its answers."""
    return [i for piece in LETTER_PIECES.findall(text) for i in tokenizer(piece, add_special_tokens=False).input_ids]
