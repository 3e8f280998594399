"""Spelled input: a user's words each followed by their letters, "Reverse planet (p l a n e t)".

A word is one or two tokens to the model, and SmolLM2-135M does not know the letters inside them
(it spells 1 of 99 common words, bench/letter_words.py), so no adapter over it can reverse, sort or
shift a plain word's letters. An adapter whose card says `"input": "spelled"` is trained on, and
served with, its users' messages in this form; it writes a plain word one token per letter (the
model cannot pick the multi-letter tokens that spell it either). The server builds both forms of a
chat prompt; the engine sends the spelled one once the request's adapters are chosen and the
heaviest of them reads spelled input.
"""

from __future__ import annotations

import re

SPELLED = "spelled"  # the card's "input" value
INPUT_FORMATS = ("plain", SPELLED)

WORD = re.compile(r"[A-Za-z]{2,}")  # single letters are already one token each
# three or more single letters written apart ("p l a n", "p, l, a", "p-l-a"): the letters are in sight
LETTERS_APART = re.compile(r"\b[A-Za-z](?:[\s,;-]+[A-Za-z]\b){2,}")
LETTER_PIECES = re.compile(r" ?[A-Za-z]|[^A-Za-z]+")  # a letter (with its leading space), or a run of others


def spell_words(text: str) -> str:
    """'Reverse planet.' -> 'Reverse (R e v e r s e) planet (p l a n e t).' A text whose letters are
    already written apart stays as it is: the instruction's spelled words would only add letters
    that are not the input's (measured: spaced inputs fell from 97% to 70% for reverse_letters)."""
    if LETTERS_APART.search(text):
        return text
    return WORD.sub(lambda m: f"{m[0]} ({' '.join(m[0])})", text)


def spelled_messages(messages: list[dict]) -> list[dict]:
    """The chat with its user turns spelled (system and assistant turns as they were)."""
    return [
        {**m, "content": spell_words(m["content"])} if m["role"] == "user" and isinstance(m.get("content"), str) else m
        for m in messages
    ]


def spelled_chat_ids(tokenizer, messages: list[dict], **template_kwargs) -> tuple[int, ...] | None:
    """The chat template's ids for `messages` with the user turns spelled; None when no word changes."""
    spelled = spelled_messages(messages)
    if spelled == messages:
        return None
    return tuple(
        tokenizer.apply_chat_template(
            spelled, add_generation_prompt=True, tokenize=True, return_dict=True, **template_kwargs
        )["input_ids"]
    )


def letter_token_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized one letter per token ("tenalp" -> t e n a l p): how a spelled-input adapter
    is trained to write its answers."""
    return [i for piece in LETTER_PIECES.findall(text) for i in tokenizer(piece, add_special_tokens=False).input_ids]
