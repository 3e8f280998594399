"""Adapter input forms: how an adapter reads its prompt.

A card may declare `"input": <form>`; "plain" (the default) is the chat as written. Any other form
rewrites the user turns before the chat template is applied (spelling.py's words-with-letters is
one). The front end, where the template is applied, builds a request's prompt in a form only when
an adapter the request may run reads that form; the request carries those prompts by form, and the
engine sends one once the adapters are chosen: the form of the heaviest chosen adapter (a gated or
weighted set reads its prompt as its heaviest member does). Training encodes by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mole_serve.spelling import spell_words

PLAIN = "plain"
SPELLED = "spelled"

# form -> how a user turn's text is written in it
REWRITES: dict[str, Callable[[str], str]] = {SPELLED: spell_words}
INPUT_FORMS: tuple[str, ...] = (PLAIN, *REWRITES)


def form_messages(form: str, messages: list[dict]) -> list[dict]:
    """The chat with its user turns in `form` (system, assistant and tool turns as they were)."""
    if form == PLAIN:
        return messages
    rewrite = REWRITES[form]
    return [
        {**m, "content": rewrite(m["content"])} if m["role"] == "user" and isinstance(m.get("content"), str) else m
        for m in messages
    ]


def form_chat_ids(form: str, tokenizer, messages: list[dict], **template_kwargs) -> tuple[int, ...] | None:
    """The chat template's ids for `messages` in `form`; None when the form changes no turn."""
    rewritten = form_messages(form, messages)
    if rewritten == messages:
        return None
    encoded = tokenizer.apply_chat_template(
        rewritten, add_generation_prompt=True, tokenize=True, return_dict=True, **template_kwargs
    )
    return tuple(encoded["input_ids"])


def form_prompts(tokenizer, messages: list[dict], forms: set[str], **template_kwargs) -> dict[str, tuple[int, ...]]:
    """The chat's ids in each of `forms` that changes it (what a request carries, by form)."""
    prompts = {form: form_chat_ids(form, tokenizer, messages, **template_kwargs) for form in sorted(forms)}
    return {form: ids for form, ids in prompts.items() if ids is not None}


def set_input_form(names: Sequence[str], weights: Sequence[float], form_of: Callable[[str], str]) -> str:
    """The form an adapter set reads its prompt in: its heaviest adapter's (plain for no adapter)."""
    if not names:
        return PLAIN
    return form_of(names[max(range(len(names)), key=weights.__getitem__)])
