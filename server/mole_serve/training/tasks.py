"""Deterministic task generators with exact-match scoring: what the shipped adapters learn.

A prompt is a phrasing (a template) over an input rendered in one of the task's input formats.
Phrasings are written the way people ask: each task has its own imperative *asks* (the task words,
paraphrased) and *questions* (question and terse forms); the asks go through shared style *frames*
(plain imperative, polite, casual, with a lead-in sentence, a request). Inputs come in the formats a
person types (a word, spaced or comma-separated letters; numbers with or without separators; the
date and time forms the task accepts).

Three splits, so that eval measures the task and not its templates:
  train        training phrasings and formats, training inputs
  eval         held-out phrasings: every template made from a task's last ask, from the last frame
               of any style (no task trains on it) or from its last two questions; inputs in the
               training formats and the task's held-out formats
  eval_inputs  training phrasings and formats on held-out inputs
An input is held out when a hash of its canonical form falls in one bucket in five, whatever its
rendering, so no eval input is ever trained on in another format.
"""

from __future__ import annotations

import calendar
import json
import random
import re
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mole_serve.library.store import adapter_dirs, read_card

SPLITS = ("train", "eval", "eval_inputs")
EVAL_BUCKETS = 5  # one input in EVAL_BUCKETS is held out

Fields = dict[str, object]
# (rng, input format) -> (template fields, answer, canonical input: what the split hashes)
Maker = Callable[[random.Random, str], tuple[Fields, str, str]]

# Shared style frames over a task's ask ("{ask}" as written, "{Ask}" capitalized). The last frame of
# each style is held out for every task.
FRAMES: dict[str, tuple[str, ...]] = {
    "imperative": ("{Ask}.", "{Ask}", "{Ask}, please.", "Now {ask}."),
    "polite": (
        "Could you please {ask}?",
        "Please {ask}.",
        "Would you {ask} for me?",
        "I'd appreciate it if you could {ask}.",
    ),
    "casual": ("hey, can you {ask}?", "{ask} pls", "quick one: {ask}", "ok so {ask}?"),
    "lead_in": (
        "I'm practicing for a quiz. {Ask}.",
        "Here's a small task for you. {Ask}.",
        "My teacher gave us this exercise. {Ask}.",
        "I'm stuck on my homework. {Ask}.",
    ),
    "request": ("Can you {ask}?", "I need you to {ask}.", "Help me {ask}.", "I want you to {ask}."),
}
TRAIN_FRAMES = tuple(f for frames in FRAMES.values() for f in frames[:-1])
HELD_OUT_FRAMES = tuple(frames[-1] for frames in FRAMES.values())


def frame(style: str, ask: str) -> str:
    """One template: the ask inside a frame. An ask whose input follows a line break keeps it after
    the framed sentence ("Could you convert this to JSON?\\n{lines}")."""
    head, sep, tail = ask.partition("\n")
    text = style.replace("{Ask}", head[:1].upper() + head[1:]).replace("{ask}", head)
    return text + sep + tail


def norm_text(s: str) -> str:
    """Case, surrounding whitespace/quotes and a final period do not count."""
    s = " ".join(s.strip().lower().split())
    return s.strip("\"'`").rstrip(".").strip()


def norm_number(s: str) -> str:
    return norm_text(s).replace(",", "").replace(" ", "")


def norm_letters(s: str) -> str:
    """Letter answers: 'cat', 'c a t', 'c, a, t' and 'c-a-t' are the same answer."""
    return re.sub(r"[\s,\-]", "", norm_text(s))


def norm_words(s: str) -> str:
    """'forty-seven' == 'forty seven'; a British 'and' is allowed."""
    return " ".join(w for w in norm_text(s).replace("-", " ").replace(",", " ").split() if w != "and")


def norm_time(s: str) -> str:
    """'2:05 PM' == '2:05pm' == '2:05 p.m.'."""
    return re.sub(r"[\s.]", "", norm_text(s))


def norm_compact(s: str) -> str:
    """Two-part answers ('555, odd'): spacing and a final period do not count."""
    return re.sub(r"\s", "", norm_text(s))


def norm_json(s: str) -> str:
    """Parsed and re-dumped, so key spacing does not count; code fences are stripped."""
    body = re.sub(r"^```(?:json)?|```$", "", s.strip()).strip()
    try:
        return json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        return body


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    description: str
    asks: tuple[str, ...]  # imperative, lower case, no final stop; the last is held out
    questions: tuple[str, ...]  # whole prompts (questions, terse forms); the last two are held out
    make: Maker
    normalize: Callable[[str], str] = norm_text
    max_new_tokens: int = 12  # enough for the longest answer plus the end token
    formats: tuple[str, ...] = ("plain",)
    held_out_formats: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()  # composite tasks: the two library tasks one answer needs
    shape: str = ""  # composite tasks: "sequential" (one part per skill) or "fused" (both at once)
    # fused composites: the first skill's answer (never written in the composite's), from the canonical input
    intermediate: Callable[[str], str] | None = None
    # its adapter reads spelled input and writes one token per letter (mole_serve/spelling.py): a task on
    # a word's letters, which the base model cannot see inside the word's tokens
    spelled: bool = False

    def templates_for(self, split: str) -> tuple[str, ...]:
        train = tuple(frame(f, a) for a in self.asks[:-1] for f in TRAIN_FRAMES) + self.questions[:-2]
        if split != "eval":
            return train
        everything = tuple(frame(f, a) for a in self.asks for f in TRAIN_FRAMES + HELD_OUT_FRAMES)
        return tuple(t for t in everything if t not in train) + self.questions[-2:]

    def formats_for(self, split: str) -> tuple[str, ...]:
        return self.formats + self.held_out_formats if split == "eval" else self.formats

    def in_eval(self, key: str) -> bool:
        return zlib.crc32(f"{self.name}|{key}".encode()) % EVAL_BUCKETS == 0

    def examples(self, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """n (prompt, answer) pairs of one split; eval prompts are distinct while the space allows."""
        return [(prompt, answer) for _, prompt, answer in self.draw(split, n, seed)]

    def draw(self, split: str, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
        """Like `examples`, with the canonical input each prompt was made from first."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        templates, formats, out, seen = self.templates_for(split), self.formats_for(split), [], set()
        for _ in range(1000 * n):
            if len(out) == n:
                break
            fields, answer, key = self.make(rng, rng.choice(formats))
            if self.in_eval(key) != (split != "train"):
                continue
            prompt = rng.choice(templates).format(**fields)
            if split != "train" and prompt in seen:
                continue
            seen.add(prompt)
            out.append((key, prompt, answer))
        return out

    def score(self, prediction: str, answer: str) -> bool:
        return self.normalize(prediction) == self.normalize(answer)

    def is_one_part(self, prediction: str, answer: str) -> bool:
        """A sequential composite: the prediction is one of the answer's two parts (one skill's
        answer each, joined by ", ") alone, as that part's skill scores it."""
        return any(TASKS[s].score(prediction, want) for s, want in zip(self.skills, answer.rsplit(", ", 1)))

    def parts_score(self, prediction: str, answer: str) -> float:
        """A sequential composite's partial credit: the share of its two parts that the prediction
        gets right, each scored as its skill scores it. A prediction with one part can match either:
        a single skill gets at most 0.5."""
        got = prediction.strip().rsplit(", ", 1)
        both_parts = sum(TASKS[s].score(g, want) for s, g, want in zip(self.skills, got, answer.rsplit(", ", 1)))
        return max(self.is_one_part(prediction, answer) / 2, both_parts / 2)


# --- generators -------------------------------------------------------------------------------

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ROMAN = (
    (1000, "M"),
    (900, "CM"),
    (500, "D"),
    (400, "CD"),
    (100, "C"),
    (90, "XC"),
    (50, "L"),
    (40, "XL"),
    (10, "X"),
    (9, "IX"),
    (5, "V"),
    (4, "IV"),
    (1, "I"),
)
# real words beside random letter strings: people ask about words, and a word is one or two tokens
# whose spelling the model has to know
WORDS = tuple(
    """cat dog sun book tree lamp fish bird milk rain snow wind star moon road door desk
chair table apple grape lemon melon bread water house mouse horse sheep plant stone river cloud
light night green black white brown music dance smile happy quick sleep dream train plane ocean
beach paper pencil garden window bottle pocket rabbit monkey orange yellow purple silver basket
candle cookie jacket ladder magnet napkin people planet rocket spider ticket tomato violin winter
summer spring autumn forest island castle bridge camera doctor family friend guitar hammer kitten
market number office parrot puzzle school street turtle wallet yogurt zebra lion bear frog king
queen ring song game park farm ship boat coat hat cup pen box key map egg jam owl fox bee ant""".split()
)


def to_words(n: int) -> str:
    if n >= 1000:
        return f"{to_words(n // 1000)} thousand" + (f" {to_words(n % 1000)}" if n % 1000 else "")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    return f"{ONES[n // 100]} hundred" + (f" {to_words(n % 100)}" if n % 100 else "")


def to_roman(n: int) -> str:
    out = ""
    for value, symbol in ROMAN:
        count, n = divmod(n, value)
        out += symbol * count
    return out


def render_number(n: int, fmt: str) -> str:
    """'plain' 12345, 'comma' 12,345, 'space' 12 345 (separators only from 1,000 up)."""
    return {"plain": str(n), "comma": f"{n:,}", "space": f"{n:,}".replace(",", " ")}[fmt]


LETTER_SEPARATORS = {"word": "", "spaced": " ", "comma": ", ", "dash": "-"}
LETTER_FORMATS = ("word", "spaced", "comma")


def draw_letters(rng: random.Random, lo: int, hi: int) -> str:
    """Half real words, half random letter strings, lo..hi letters."""
    if rng.random() < 0.5:
        return rng.choice([w for w in WORDS if lo <= len(w) <= hi])
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def letters_task(transform: Callable[[str], str], lo: int, hi: int) -> Maker:
    """A letters-in, letters-out task; the answer is written the way the input was."""

    def make(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
        w = draw_letters(rng, lo, hi)
        sep = LETTER_SEPARATORS[fmt]
        return {"w": sep.join(w)}, sep.join(transform(w)), w

    return make


def reverse(w: str) -> str:
    return w[::-1]


def alphabetize(w: str) -> str:
    return "".join(sorted(w))


def caesar(w: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w)


def make_add(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return {"a": a, "b": b}, str(a + b), f"{a}+{b}"


def make_mul(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    a, b = rng.randint(12, 99), rng.randint(3, 9)
    return {"a": a, "b": b}, str(a * b), f"{a}*{b}"


def make_int_to_roman(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    n = rng.randint(1, 999) if rng.random() < 0.7 else rng.randint(1000, 3999)
    return {"n": n}, to_roman(n), str(n)


def make_roman_to_int(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    n = rng.randint(1, 999) if rng.random() < 0.7 else rng.randint(1000, 3999)
    r = to_roman(n)
    return {"r": r.lower() if fmt == "lower" else r}, str(n), r


def make_words(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    n = rng.randint(0, 999) if rng.random() < 0.6 else rng.randint(1000, 9999)
    return {"n": render_number(n, fmt)}, to_words(n), str(n)


def make_parity(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    n = rng.randint(1, 999) if rng.random() < 0.3 else rng.randint(1000, 999999)
    return {"n": render_number(n, fmt)}, "even" if n % 2 == 0 else "odd", str(n)


DATE_SEPARATORS = {"dash": "-", "slash": "/", "dot": "."}


def make_date(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    y, m = rng.randint(1950, 2049), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    sep = DATE_SEPARATORS[fmt]
    return {"d": f"{y:04d}{sep}{m:02d}{sep}{d:02d}"}, f"{calendar.month_name[m]} {d}, {y}", f"{y}{m:02d}{d:02d}"


def make_time(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """'colon' 09:05 / 14:30, 'short' 9:05, 'compact' 0905, 'h' 14h30."""
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    t = {"colon": f"{h:02d}:{m:02d}", "short": f"{h}:{m:02d}", "compact": f"{h:02d}{m:02d}", "h": f"{h:02d}h{m:02d}"}[
        fmt
    ]
    return {"t": t}, f"{h % 12 or 12}:{m:02d} {'AM' if h < 12 else 'PM'}", f"{h:02d}{m:02d}"


KV_VALUES: dict[str, Callable[[random.Random], object]] = {
    "name": lambda r: r.choice("Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar".split()),
    "age": lambda r: r.randint(18, 90),
    "city": lambda r: r.choice("Paris Tokyo Lima Cairo Oslo Rome Seoul Quito Dublin Lagos".split()),
    "color": lambda r: r.choice("red green blue yellow purple orange black white".split()),
    "score": lambda r: r.randint(0, 100),
}
KV_LAYOUTS = {"colon": ("{k}: {v}", "\n"), "equals": ("{k}={v}", "\n"), "inline": ("{k}: {v}", ", ")}


def make_kv_json(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    keys = rng.sample(sorted(KV_VALUES), rng.choice((2, 2, 3)))
    record = {k: KV_VALUES[k](rng) for k in keys}
    pair, join = KV_LAYOUTS[fmt]
    lines = join.join(pair.format(k=k, v=v) for k, v in record.items())
    return {"lines": lines}, json.dumps(record), json.dumps(record)


POSITIVE = (
    "works perfectly",
    "exceeded my expectations",
    "is worth every penny",
    "made me very happy",
    "is excellent quality",
    "arrived early and works great",
    "is the best I have owned",
    "does exactly what it promises",
    "is sturdy and well made",
    "gets compliments all the time",
    "was a great buy",
    "is so easy to use",
    "still looks brand new",
    "is absolutely fantastic",
)
NEGATIVE = (
    "broke after two days",
    "was a waste of money",
    "stopped working quickly",
    "is very poorly made",
    "arrived damaged",
    "was a big disappointment",
    "is the worst I have owned",
    "fell apart in a week",
    "does not work at all",
    "feels cheap and flimsy",
    "is not worth the price",
    "smells awful",
    "went straight back to the store",
    "is a total letdown",
)
PRODUCTS = (
    "blender",
    "lamp",
    "backpack",
    "kettle",
    "phone case",
    "chair",
    "keyboard",
    "jacket",
    "tent",
    "heater",
    "toaster",
    "mattress",
    "umbrella",
    "vacuum",
    "headphones",
    "coffee maker",
)
OPENERS = (
    "I bought this last month.",
    "Ordered it for my sister.",
    "Got this as a gift.",
    "",
    "Second purchase from this shop.",
    "Used it every day for a week.",
    "Honestly?",
    "Long-time customer here.",
    "Had high hopes.",
)
CLOSERS = ("", "", "Would recommend.", "Never again.", "Five stars.", "One star.", "")


def make_sentiment(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    positive = rng.random() < 0.5
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    # a closer never contradicts the label
    closer = rng.choice(
        [
            c
            for c in CLOSERS
            if c not in (("One star.", "Never again.") if positive else ("Would recommend.", "Five stars."))
        ]
    )
    review = " ".join(p for p in (rng.choice(OPENERS), f"The {rng.choice(PRODUCTS)} {phrase}.", closer) if p)
    return {"review": f'"{review}"' if fmt == "quoted" else review}, "positive" if positive else "negative", review


def make_vowels(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    w = "".join(rng.choice("aeiou" if rng.random() < 0.4 else "bcdfghklmnprstvwz") for _ in range(5))
    return {"w": LETTER_SEPARATORS[fmt].join(w)}, str(sum(c in "aeiou" for c in w)), w


# --- composite tasks: one answer needs two library skills; no adapter trains on them -----------


def make_datetime(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """Sequential: iso_date_to_text, then time_24h_to_12h ('2024-03-05 14:30' or '...T14:30')."""
    date, date_text, date_key = make_date(rng, "dash")
    time, time_text, time_key = make_time(rng, "colon")
    stamp = f"{date['d']}{'T' if fmt == 'iso' else ' '}{time['t']}"
    return {"dt": stamp}, f"{date_text}, {time_text}", date_key + time_key


def make_words_and_roman(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """Sequential: number_to_words, then int_to_roman."""
    n = rng.randint(1, 999)
    return {"n": n}, f"{to_words(n)}, {to_roman(n)}", str(n)


def make_sum_and_parity(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """Sequential: add_3digit, then odd_or_even of the sum."""
    fields, total, key = make_add(rng, fmt)
    return fields, f"{total}, {'even' if int(total) % 2 == 0 else 'odd'}", key


def make_sum_in_roman(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """Fused: add_3digit, written by int_to_roman."""
    fields, total, key = make_add(rng, fmt)
    return fields, to_roman(int(total)), key


def make_roman_to_words(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """Fused: roman_to_int, written by number_to_words."""
    n = rng.randint(1, 999)
    return {"r": to_roman(n)}, to_words(n), str(n)


def make_reverse_then_shift(rng: random.Random, fmt: str) -> tuple[Fields, str, str]:
    """Fused: reverse_letters, then caesar_shift on the result."""
    return letters_task(lambda w: caesar(reverse(w)), 3, 6)(rng, fmt)


# --- the registry -----------------------------------------------------------------------------

TASK_LIST = (
    Task(
        "add_3digit",
        "arithmetic",
        "Add two three-digit numbers and give the sum.",
        (
            "add {a} and {b}",
            "work out {a} + {b}",
            "compute the sum of {a} and {b}",
            "calculate {a}+{b}",
            "find the total of {a} and {b}",
            "tell me what {a} plus {b} comes to",
        ),
        (
            "What is {a} + {b}?",
            "What's {a} plus {b}?",
            "{a} + {b} = ?",
            "{a}+{b}?",
            "If I have {a} and add {b}, how much is that?",
            "How much is {a} and {b} together?",
            "{a} plus {b}?",
        ),
        make_add,
        norm_number,
        8,
    ),
    Task(
        "multiply_1digit",
        "arithmetic",
        "Multiply a two-digit number by a one-digit number.",
        (
            "multiply {a} by {b}",
            "compute {a} times {b}",
            "calculate {a} x {b}",
            "find the product of {a} and {b}",
            "work out {a}*{b}",
            "tell me what {a} multiplied by {b} is",
        ),
        (
            "What is {a} * {b}?",
            "What's {a} times {b}?",
            "{a} x {b} = ?",
            "{a}*{b}?",
            "What do you get when you multiply {a} by {b}?",
            "{a} times {b}?",
        ),
        make_mul,
        norm_number,
        8,
    ),
    Task(
        "int_to_roman",
        "numerals",
        "Write an integer in Roman numerals.",
        (
            "write {n} in Roman numerals",
            "convert {n} to a Roman numeral",
            "turn {n} into Roman numerals",
            "express the number {n} using Roman numerals",
            "give me the Roman numeral for {n}",
            "show how the Romans would write {n}",
        ),
        (
            "What is {n} as a Roman numeral?",
            "Roman numeral for {n}?",
            "{n} in Roman numerals?",
            "How do you write {n} in Roman numerals?",
            "{n} -> Roman",
            "How would {n} look as a Roman numeral?",
            "{n} in roman?",
        ),
        make_int_to_roman,
        norm_text,
        16,
    ),
    Task(
        "roman_to_int",
        "numerals",
        "Read a Roman numeral and give its value as an integer.",
        (
            "convert the Roman numeral {r} to a number",
            "give the value of the Roman numeral {r}",
            "translate {r} from Roman numerals into digits",
            "write the Roman numeral {r} as an ordinary number",
            "tell me what number {r} is",
            "decode the Roman numeral {r} into a regular number",
        ),
        (
            "What number is the Roman numeral {r}?",
            "What is {r} in Arabic numerals?",
            "{r} in digits?",
            "Which integer does {r} stand for?",
            "{r} = ?",
            "What does the Roman numeral {r} mean as a number?",
            "How much is {r}?",
        ),
        make_roman_to_int,
        norm_number,
        8,
        ("upper", "lower"),
    ),
    Task(
        "number_to_words",
        "numerals",
        "Spell out a number in English words.",
        (
            "write {n} in words",
            "spell out the number {n}",
            "convert {n} to words",
            "write the number {n} out in English",
            "give me the English words for {n}",
            "put {n} into written words",
        ),
        (
            "How do you write {n} in English words?",
            "What is {n} written out in words?",
            "{n} in words?",
            "How do you spell {n}?",
            "{n} spelled out?",
            "How would you say {n} in words?",
            "{n} -> words",
        ),
        make_words,
        norm_words,
        16,
        ("plain", "comma"),
    ),
    Task(
        "reverse_letters",
        "strings",
        "Reverse the order of the letters of a word or letter sequence.",
        (
            "reverse the letters: {w}",
            "write {w} backwards",
            "reverse the order of the letters in {w}",
            "spell {w} in reverse",
            "flip the letters {w} around",
            "give me {w} with its letters reversed",
        ),
        (
            "What is {w} backwards?",
            "What are the letters {w} in reverse?",
            "{w} reversed?",
            "How do you spell {w} backwards?",
            "Reverse: {w}",
            "What do you get if you read {w} from right to left?",
            "{w} backwards?",
        ),
        letters_task(reverse, 3, 6),
        norm_letters,
        16,
        LETTER_FORMATS,
        ("dash",),
        spelled=True,
    ),
    Task(
        "sort_letters",
        "strings",
        "Sort the letters of a word or letter sequence into alphabetical order.",
        (
            "sort these letters alphabetically: {w}",
            "put the letters of {w} in alphabetical order",
            "arrange {w} in alphabetical order",
            "alphabetize the letters {w}",
            "order the letters of {w} from a to z",
            "rearrange {w} so its letters are in ABC order",
        ),
        (
            "What are the letters {w} in alphabetical order?",
            "{w} sorted alphabetically?",
            "Alphabetize: {w}",
            "How do the letters of {w} go in alphabetical order?",
            "Sort: {w}",
            "What do you get if you sort the letters of {w}?",
            "{w} in ABC order?",
        ),
        letters_task(alphabetize, 3, 6),
        norm_letters,
        16,
        LETTER_FORMATS,
        ("dash",),
        spelled=True,
    ),
    Task(
        "caesar_shift",
        "strings",
        "Shift every letter one place forward in the alphabet (Caesar cipher).",
        (
            "shift each letter forward by one: {w}",
            "apply a Caesar shift of 1 to {w}",
            "encode {w} with a Caesar cipher of shift one",
            "replace each letter of {w} with the next letter",
            "move every letter in {w} one step forward in the alphabet",
            "encrypt {w} using a shift of 1",
        ),
        (
            "What is {w} with a Caesar shift of 1?",
            "Caesar shift by 1: {w}",
            "{w} shifted by one letter?",
            "What does {w} become if every letter moves one forward?",
            "ROT1: {w}",
            "What is {w} in a Caesar cipher with key 1?",
            "{w} +1 Caesar?",
        ),
        letters_task(caesar, 3, 6),
        norm_letters,
        16,
        LETTER_FORMATS,
        ("dash",),
        spelled=True,
    ),
    Task(
        "iso_date_to_text",
        "formats",
        "Rewrite a numeric date (YYYY-MM-DD, YYYY/MM/DD) as 'Month D, YYYY'.",
        (
            "write the date {d} in words",
            "convert {d} to the format Month D, YYYY",
            "format the date {d} as a US-style long date",
            "rewrite {d} as month name, day, year",
            "spell out the month in the date {d}",
            "express the date {d} in long form",
        ),
        (
            "Long date for {d}?",
            "What is {d} written out?",
            "{d} as a long date?",
            "How would you write {d} with the month spelled out?",
            "{d} -> Month D, YYYY",
            "What date is {d}, in words?",
            "{d} in long form?",
        ),
        make_date,
        norm_text,
        12,
        ("dash", "slash"),
        ("dot",),
    ),
    Task(
        "time_24h_to_12h",
        "formats",
        "Convert a 24-hour clock time to 12-hour time with AM/PM.",
        (
            "convert {t} to 12-hour time",
            "write the time {t} on a 12-hour clock",
            "change {t} from 24-hour to 12-hour format",
            "express {t} in AM/PM format",
            "give me {t} as a 12-hour time",
            "turn the military time {t} into normal AM/PM time",
        ),
        (
            "What is {t} in AM/PM format?",
            "12-hour time for {t}?",
            "What time is {t} on a 12-hour clock?",
            "{t} in am/pm?",
            "{t} -> 12h",
            "How do you say {t} with AM or PM?",
            "What's {t} in 12-hour time?",
        ),
        make_time,
        norm_time,
        8,
        ("colon", "short", "compact"),
        ("h",),
    ),
    Task(
        "kv_to_json",
        "formats",
        "Turn 'key: value' pairs into a JSON object.",
        (
            "convert this to JSON\n{lines}",
            "turn these key-value pairs into a JSON object\n{lines}",
            "write this record as JSON\n{lines}",
            "make a JSON object from these fields\n{lines}",
            "format the following as JSON\n{lines}",
            "encode these fields as a JSON object\n{lines}",
        ),
        (
            "JSON for:\n{lines}",
            "What is this as JSON?\n{lines}",
            "{lines}\nAs JSON?",
            "To JSON:\n{lines}",
            "How would this look as a JSON object?\n{lines}",
            "{lines}\n-> JSON",
        ),
        make_kv_json,
        norm_json,
        32,
        ("colon", "equals"),
        ("inline",),
    ),
    Task(
        "review_sentiment",
        "classification",
        "Say whether a product review is positive or negative.",
        (
            "classify the sentiment of this review as positive or negative: {review}",
            "tell me if this review is positive or negative: {review}",
            "label this review positive or negative: {review}",
            "decide whether the following review is positive or negative: {review}",
            "rate the sentiment (positive/negative) of this review: {review}",
            "say whether this customer review is positive or negative: {review}",
        ),
        (
            "Is this review positive or negative? {review}",
            "Sentiment (positive/negative): {review}",
            "{review} Positive or negative?",
            "Does this customer like the product? Positive or negative. {review}",
            "Positive or negative review? {review}",
            "What is the sentiment of this review? {review}",
            "{review} Good or bad review, positive or negative?",
        ),
        make_sentiment,
        norm_text,
        4,
        ("plain", "quoted"),
    ),
    Task(
        "odd_or_even",
        "classification",
        "Say whether an integer is odd or even.",
        (
            "tell me whether {n} is odd or even",
            "classify {n} as odd or even",
            "determine if {n} is even or odd",
            "check whether the number {n} is odd or even",
            "say if {n} is an even or an odd number",
            "figure out whether {n} is even or odd",
        ),
        (
            "Is {n} odd or even?",
            "Odd or even: {n}",
            "{n}: even or odd?",
            "Is the number {n} even or is it odd?",
            "{n} odd or even?",
            "Is {n} an even number or an odd one?",
            "Even or odd, {n}?",
        ),
        make_parity,
        norm_text,
        4,
        ("plain", "comma"),
        ("space",),
    ),
    Task(
        "count_vowels",
        "classification",
        "Count the vowels in a sequence of letters.",
        (
            "count the vowels in {w}",
            "tell me how many vowels are in {w}",
            "count how many vowels appear in {w}",
            "give me the number of vowels in {w}",
            "find the vowel count of {w}",
            "work out how many vowels {w} has",
        ),
        (
            "How many vowels are in: {w}",
            "Number of vowels in {w}?",
            "Vowel count of {w}?",
            "How many of these letters are vowels? {w}",
            "{w}: how many vowels?",
            "How many vowels does {w} have?",
        ),
        make_vowels,
        norm_number,
        4,
        ("spaced", "word"),
    ),
)
TASKS: dict[str, Task] = {t.name: t for t in TASK_LIST}
# no shipped adapter: where `mole-serve eval` sees what retrieval and the gate do when the library cannot help
OUT_OF_DOMAIN = ("multiply_1digit", "count_vowels")

COMPOSITE_LIST = (
    Task(
        "datetime_to_text",
        "composite",
        "Rewrite an ISO date-time as 'Month D, YYYY, H:MM AM/PM'.",
        (
            "write the date and time {dt} in words with a 12-hour clock",
            "convert {dt} to a long date and AM/PM time",
            "format {dt} as Month D, YYYY, H:MM AM/PM",
            "rewrite the timestamp {dt} in plain English with AM or PM",
            "spell out the month of {dt} and give the time in 12-hour format",
            "turn the timestamp {dt} into a readable date and 12-hour time",
        ),
        (
            "What is {dt} as a long date with AM/PM time?",
            "{dt} in words, 12-hour clock?",
            "How would you write {dt} with the month spelled out and AM/PM?",
            "{dt} -> Month D, YYYY, H:MM AM/PM",
            "What date and time is {dt}, written out?",
            "{dt} as a readable date and time?",
        ),
        make_datetime,
        norm_time,
        20,
        ("space", "iso"),
        skills=("iso_date_to_text", "time_24h_to_12h"),
        shape="sequential",
    ),
    Task(
        "number_words_and_roman",
        "composite",
        "Write a number in English words and in Roman numerals.",
        (
            "write {n} in words and in Roman numerals",
            "spell out {n}, then give it as a Roman numeral",
            "give me {n} in English words and as a Roman numeral",
            "express {n} both in words and in Roman numerals",
            "write the number {n} out in English and then in Roman numerals",
            "tell me how {n} is written in words and how the Romans wrote it",
        ),
        (
            "How do you write {n} in words and in Roman numerals?",
            "{n} in words and in Roman numerals?",
            "What is {n} in English words, and as a Roman numeral?",
            "{n} -> words, Roman",
            "How is {n} spelled out, and what is its Roman numeral?",
            "{n}: words and roman?",
        ),
        make_words_and_roman,
        norm_words,
        24,
        skills=("number_to_words", "int_to_roman"),
        shape="sequential",
    ),
    Task(
        "sum_and_parity",
        "composite",
        "Add two three-digit numbers, then say whether the sum is odd or even.",
        (
            "add {a} and {b} and tell me whether the sum is odd or even",
            "work out {a} + {b}, then say if the result is even or odd",
            "compute the sum of {a} and {b} and its parity",
            "find the total of {a} and {b} and whether it is odd or even",
            "calculate {a}+{b} and classify the result as odd or even",
            "tell me what {a} plus {b} comes to and if that is even or odd",
        ),
        (
            "What is {a} + {b}, and is it odd or even?",
            "{a} + {b} = ? Odd or even?",
            "{a}+{b}: sum and parity?",
            "Is the sum of {a} and {b} odd or even, and what is it?",
            "{a} plus {b}, and is that even or odd?",
            "How much is {a} and {b} together, and is the total odd or even?",
        ),
        make_sum_and_parity,
        norm_compact,
        10,
        skills=("add_3digit", "odd_or_even"),
        shape="sequential",
    ),
    Task(
        "sum_in_roman",
        "composite",
        "Add two three-digit numbers and write the sum in Roman numerals.",
        (
            "add {a} and {b} and write the sum in Roman numerals",
            "give the sum of {a} and {b} as a Roman numeral",
            "compute {a} + {b} in Roman numerals",
            "write {a} plus {b} as a Roman numeral",
            "find the total of {a} and {b} and express it in Roman numerals",
            "tell me what {a} + {b} is, using Roman numerals",
        ),
        (
            "What is {a} + {b} in Roman numerals?",
            "{a}+{b} as a Roman numeral?",
            "How do the Romans write the sum of {a} and {b}?",
            "{a} + {b} -> Roman",
            "What is the Roman numeral for {a} plus {b}?",
            "Sum of {a} and {b}, in roman?",
        ),
        make_sum_in_roman,
        norm_text,
        16,
        skills=("add_3digit", "int_to_roman"),
        shape="fused",
        intermediate=lambda key: str(sum(map(int, key.split("+")))),
    ),
    Task(
        "roman_to_words",
        "composite",
        "Write the value of a Roman numeral in English words.",
        (
            "write the Roman numeral {r} in English words",
            "spell out the value of the Roman numeral {r}",
            "convert {r} from Roman numerals to words",
            "give me the English words for the Roman numeral {r}",
            "translate the Roman numeral {r} into written English",
            "tell me how to say the Roman numeral {r} in words",
        ),
        (
            "What is the Roman numeral {r} in words?",
            "{r} in English words?",
            "How do you say {r} in words?",
            "{r} -> words",
            "What number is {r}, spelled out?",
            "Roman numeral {r}, in words?",
        ),
        make_roman_to_words,
        norm_words,
        12,
        skills=("roman_to_int", "number_to_words"),
        shape="fused",
        intermediate=str,
    ),
    Task(
        "reverse_then_shift",
        "composite",
        "Reverse the letters, then shift each one forward by one (Caesar).",
        (
            "reverse the letters {w} and then shift each one forward by one",
            "write {w} backwards and apply a Caesar shift of 1",
            "reverse {w}, then encode it with a Caesar shift of one",
            "flip {w} around and move every letter one step forward in the alphabet",
            "spell {w} in reverse, replacing each letter with the next one",
            "give me {w} reversed and shifted by one letter",
        ),
        (
            "What is {w} backwards, shifted by one?",
            "{w} reversed, then Caesar +1?",
            "What do you get if you reverse {w} and shift every letter forward by one?",
            "Reverse then ROT1: {w}",
            "{w} backwards with a Caesar shift of 1?",
            "What is {w} read right to left, each letter moved up one?",
        ),
        make_reverse_then_shift,
        norm_letters,
        16,
        LETTER_FORMATS,
        ("dash",),
        skills=("reverse_letters", "caesar_shift"),
        shape="fused",
        intermediate=lambda key: key[::-1],
    ),
)
COMPOSITES: dict[str, Task] = {t.name: t for t in COMPOSITE_LIST}


def task_library(adapters_dir: Path) -> dict[str, str]:
    """task -> adapter name, for the adapters whose card names a task of the generators; where
    several do (a task's LoRA and its MELoRA twin), the one named after the task."""
    library = {}
    for name, path in adapter_dirs(adapters_dir).items():
        task = read_card(path).get("task")
        if task in TASKS and library.get(task) != task:
            library[task] = name
    return library
