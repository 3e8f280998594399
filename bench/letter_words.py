"""Letter tasks on whole words: what the letter adapters do when a person types a plain word.

reverse_letters, sort_letters and caesar_shift work on the letters of their input. Written as spaced
letters ("p l a n e t") each letter is its own token; written as a plain word ("planet") the letters
sit inside one or two tokens and the model has to know the word's spelling, which SmolLM2-135M does
not: beside the adapters, the base model's few-shot spelling of the same words. An adapter whose card
says `"input": "spelled"` reads the prompt as the server sends it to it, each word followed by its
letters (the `spelled` input form, mole_serve/spelling.py). On the same words and the same held-out
phrasings, each adapter answers the word written plainly and spaced (the baseline).

Words: the library's held-out words (its eval split) and common words in no split at all.

    python -m bench.letter_words --out bench/results/letter_words.json
"""

from __future__ import annotations

import argparse
import random

import torch
from mole_serve.config import Settings
from mole_serve.input_forms import SPELLED
from mole_serve.library.store import read_card
from mole_serve.training.tasks import TASKS, WORDS, alphabetize, caesar, reverse, task_library
from mole_serve.training.train_adapter import generate, load_base

from bench.common import machine, write_json

# the letter tasks and the transform each applies to a word
LETTER_TASKS = {"reverse_letters": reverse, "sort_letters": alphabetize, "caesar_shift": caesar}
# common words a person might type, none of them in the library's WORDS
COMMON = tuple(
    """hello world python banana coffee sugar honey pizza pasta tiger eagle whale shark cheese
butter carrot potato onion pepper salad soup bacon steak knife spoon plate glass towel soap brush phone
radio piano drum flute bench sofa clock watch shirt shoes socks scarf glove""".split()
)
SPELLING_SHOTS = ("planet", "garden", "music", "friend", "basket", "stone")


@torch.no_grad()
def spelled_by_base(model, tok, words: list[str]) -> list[bool]:
    """Few-shot 'The word X is spelled x-x-x.' completions: does the base know each word's letters?"""
    shots = "".join(f"The word {w} is spelled {'-'.join(w)}.\n" for w in SPELLING_SHOTS)
    right = []
    for w in words:
        ids = tok(f"{shots}The word {w} is spelled", return_tensors="pt").input_ids  # [1, T]
        out = model.generate(ids, max_new_tokens=2 * len(w) + 2, do_sample=False, pad_token_id=tok.pad_token_id)
        got = tok.decode(out[0, ids.shape[1] :]).split("\n")[0].strip().rstrip(".")
        right.append(got.replace("-", "") == w)
    return right


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/letter_words.json")
    args = ap.parse_args(argv)

    settings = Settings()
    library = task_library(settings.adapters_dir)
    model, tok, _ = load_base(settings)
    assert not set(COMMON) & set(WORDS), "COMMON must stay outside the library's words"
    from peft import PeftModel

    peft_model = None
    result: dict = {"machine": machine(), "tasks": {}}
    every_word: set[str] = set()
    for name in LETTER_TASKS:
        task, path = TASKS[name], settings.adapters_dir / library[name]
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            peft_model.load_adapter(path, adapter_name=name)
        peft_model.set_adapter(name)
        spelled_input = read_card(path).get("input") == SPELLED
        words = [w for w in WORDS if task.in_eval(w)] + list(COMMON)
        every_word |= set(words)
        rng = random.Random(name)
        templates = [rng.choice(task.templates_for("eval")) for _ in words]
        row = {}
        for rendering, sep in (("word", ""), ("spaced", " ")):
            prompts = [t.format(w=sep.join(w)) for t, w in zip(templates, words)]
            answers = [sep.join(LETTER_TASKS[name](w)) for w in words]
            preds = generate(peft_model, tok, prompts, task.max_new_tokens, spelled=spelled_input)
            row[rendering] = sum(task.score(p, a) for p, a in zip(preds, answers)) / len(words)
        row["word_over_spaced"] = round(row["word"] / row["spaced"], 3) if row["spaced"] else None
        row["n_words"] = len(words)
        row["input"] = SPELLED if spelled_input else "plain"
        result["tasks"][name] = row
        print(
            f"{name:16s} plain word {row['word']:.0%}  spaced letters {row['spaced']:.0%}  "
            f"({len(words)} words, {row['input']} input)",
            flush=True,
        )
    words = sorted(every_word)
    with peft_model.disable_adapter():
        spelled = spelled_by_base(peft_model, tok, words)
    result["base_spelling"] = {
        "accuracy": sum(spelled) / len(words),
        "n_words": len(words),
        "shots": len(SPELLING_SHOTS),
    }
    print(f"base model spells {sum(spelled)}/{len(words)} of these words ({len(SPELLING_SHOTS)}-shot)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
