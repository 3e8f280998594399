"""Deterministic task generators with exact-match scoring: what the shipped adapters learn.

Every task draws inputs from a seeded generator. An input belongs to the eval split when a hash of
it falls in one bucket in five, so train and eval inputs never overlap whatever the seeds; the last
`N_EVAL_TEMPLATES` phrasings of a task are also held out of training, so eval measures the task,
not one wording of it. Answers are short (a few tokens) to keep training and eval cheap.
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

from server.library.store import adapter_dirs, read_card

N_EVAL_TEMPLATES = 2
EVAL_BUCKETS = 5  # one input in EVAL_BUCKETS goes to eval

Fields = dict[str, object]
Maker = Callable[[random.Random], tuple[Fields, str]]


def norm_text(s: str) -> str:
    """Case, surrounding whitespace/quotes and a final period do not count."""
    s = " ".join(s.strip().lower().split())
    return s.strip("\"'`").rstrip(".").strip()


def norm_number(s: str) -> str:
    return norm_text(s).replace(",", "").replace(" ", "")


def norm_letters(s: str) -> str:
    """Spaced-letter answers: 'c a t', 'cat' and 'c, a, t' are the same answer."""
    return re.sub(r"[\s,]", "", norm_text(s))


def norm_words(s: str) -> str:
    """'forty-seven' == 'forty seven'; a British 'and' is allowed."""
    return " ".join(w for w in norm_text(s).replace("-", " ").split() if w != "and")


def norm_time(s: str) -> str:
    """'2:05 PM' == '2:05pm' == '2:05 p.m.'."""
    return re.sub(r"[\s.]", "", norm_text(s))


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
    templates: tuple[str, ...]  # str.format patterns over the fields `make` returns
    make: Maker
    normalize: Callable[[str], str] = norm_text
    max_new_tokens: int = 12  # enough for the longest answer plus the end token

    def templates_for(self, split: str) -> tuple[str, ...]:
        return self.templates[-N_EVAL_TEMPLATES:] if split == "eval" else self.templates[:-N_EVAL_TEMPLATES]

    def in_eval(self, fields: Fields) -> bool:
        key = f"{self.name}|" + "|".join(str(v) for v in fields.values())
        return zlib.crc32(key.encode()) % EVAL_BUCKETS == 0

    def examples(self, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """n (prompt, answer) pairs of one split; eval prompts are distinct while the space allows."""
        return [(prompt, answer) for _, prompt, answer in self.draw(split, n, seed)]

    def draw(self, split: str, n: int, seed: int = 0) -> list[tuple[Fields, str, str]]:
        """Like `examples`, with the input fields each prompt was made from."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        templates, out, seen = self.templates_for(split), [], set()
        for _ in range(1000 * n):
            if len(out) == n:
                break
            fields, answer = self.make(rng)
            if self.in_eval(fields) != (split == "eval"):
                continue
            prompt = rng.choice(templates).format(**fields)
            if split == "eval" and prompt in seen:
                continue
            seen.add(prompt)
            out.append((fields, prompt, answer))
        return out

    def score(self, prediction: str, answer: str) -> bool:
        return self.normalize(prediction) == self.normalize(answer)


# --- generators -------------------------------------------------------------------------------

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
         (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


def to_words(n: int) -> str:
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


def spaced(letters: str) -> str:
    return " ".join(letters)


def random_letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def make_add(rng: random.Random) -> tuple[Fields, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return {"a": a, "b": b}, str(a + b)


def make_mul(rng: random.Random) -> tuple[Fields, str]:
    a, b = rng.randint(12, 99), rng.randint(3, 9)
    return {"a": a, "b": b}, str(a * b)


def make_int_to_roman(rng: random.Random) -> tuple[Fields, str]:
    n = rng.randint(1, 999)
    return {"n": n}, to_roman(n)


def make_roman_to_int(rng: random.Random) -> tuple[Fields, str]:
    n = rng.randint(1, 999)
    return {"r": to_roman(n)}, str(n)


def make_words(rng: random.Random) -> tuple[Fields, str]:
    n = rng.randint(1, 999)
    return {"n": n}, to_words(n)


def make_reverse(rng: random.Random) -> tuple[Fields, str]:
    w = random_letters(rng, 4, 6)
    return {"w": spaced(w)}, spaced(w[::-1])


def make_sort(rng: random.Random) -> tuple[Fields, str]:
    w = random_letters(rng, 4, 6)
    return {"w": spaced(w)}, spaced("".join(sorted(w)))


def make_caesar(rng: random.Random) -> tuple[Fields, str]:
    w = random_letters(rng, 3, 6)
    shifted = "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w)
    return {"w": spaced(w)}, spaced(shifted)


def make_date(rng: random.Random) -> tuple[Fields, str]:
    y, m = rng.randint(1950, 2049), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    return {"d": f"{y:04d}-{m:02d}-{d:02d}"}, f"{calendar.month_name[m]} {d}, {y}"


def make_time(rng: random.Random) -> tuple[Fields, str]:
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    return {"t": f"{h:02d}:{m:02d}"}, f"{h % 12 or 12}:{m:02d} {'AM' if h < 12 else 'PM'}"


KV_VALUES: dict[str, Callable[[random.Random], object]] = {
    "name": lambda r: r.choice("Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar".split()),
    "age": lambda r: r.randint(18, 90),
    "city": lambda r: r.choice("Paris Tokyo Lima Cairo Oslo Rome Seoul Quito Dublin Lagos".split()),
    "color": lambda r: r.choice("red green blue yellow purple orange black white".split()),
    "score": lambda r: r.randint(0, 100),
}


def make_kv_json(rng: random.Random) -> tuple[Fields, str]:
    keys = rng.sample(sorted(KV_VALUES), 2)
    record = {k: KV_VALUES[k](rng) for k in keys}
    return {"lines": "\n".join(f"{k}: {v}" for k, v in record.items())}, json.dumps(record)


POSITIVE = ("works perfectly", "exceeded my expectations", "is worth every penny", "made me very happy",
            "is excellent quality", "arrived early and works great", "is the best I have owned")
NEGATIVE = ("broke after two days", "was a waste of money", "stopped working quickly", "is very poorly made",
            "arrived damaged", "was a big disappointment", "is the worst I have owned")
PRODUCTS = ("blender", "lamp", "backpack", "kettle", "phone case", "chair", "keyboard", "jacket", "tent",
            "heater")
OPENERS = ("I bought this last month.", "Ordered it for my sister.", "Got this as a gift.", "",
           "Second purchase from this shop.", "Used it every day for a week.")


def make_sentiment(rng: random.Random) -> tuple[Fields, str]:
    positive = rng.random() < 0.5
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    review = f"{rng.choice(OPENERS)} The {rng.choice(PRODUCTS)} {phrase}.".strip()
    return {"review": review}, "positive" if positive else "negative"


def make_parity(rng: random.Random) -> tuple[Fields, str]:
    n = rng.randint(100, 99999)
    return {"n": n}, "even" if n % 2 == 0 else "odd"


def make_vowels(rng: random.Random) -> tuple[Fields, str]:
    w = "".join(rng.choice("aeiou" if rng.random() < 0.4 else "bcdfghklmnprstvwz") for _ in range(5))
    return {"w": spaced(w)}, str(sum(c in "aeiou" for c in w))


# --- the registry: the last N_EVAL_TEMPLATES phrasings of each task are eval-only -------------

TASK_LIST = (
    Task("add_3digit", "arithmetic", "Add two three-digit numbers and give the sum.", (
        "What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
        "{a} plus {b} equals what?", "Calculate {a} + {b}.",
        "What do you get when you add {a} to {b}?", "Find the total of {a} and {b}.",
    ), make_add, norm_number, 8),
    Task("multiply_1digit", "arithmetic", "Multiply a two-digit number by a one-digit number.", (
        "What is {a} * {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}.",
        "What is the product of {a} and {b}?", "Calculate {a} x {b}.",
        "What do you get when you multiply {a} by {b}?", "Find {a} multiplied by {b}.",
    ), make_mul, norm_number, 8),
    Task("int_to_roman", "numerals", "Write an integer in Roman numerals.", (
        "Write {n} in Roman numerals.", "Convert {n} to a Roman numeral.", "What is {n} as a Roman numeral?",
        "Express the number {n} using Roman numerals.", "Roman numeral for {n}?",
        "How do the Romans write {n}?", "Turn {n} into Roman numerals.",
    ), make_int_to_roman, norm_text, 12),
    Task("roman_to_int", "numerals", "Read a Roman numeral and give its value as an integer.", (
        "What number is the Roman numeral {r}?", "Convert the Roman numeral {r} to an integer.",
        "What is {r} in Arabic numerals?", "Give the value of the Roman numeral {r}.", "{r} in digits?",
        "Which integer does {r} stand for?", "Translate the Roman numeral {r} into a number.",
    ), make_roman_to_int, norm_number, 8),
    Task("number_to_words", "numerals", "Spell out a number in English words.", (
        "Write {n} in words.", "Spell out the number {n}.", "How do you write {n} in English words?",
        "Convert {n} to words.", "Express {n} in written English.",
        "What is {n} written out in words?", "Give the English words for {n}.",
    ), make_words, norm_words, 12),
    Task("reverse_letters", "strings", "Reverse the order of a sequence of letters.", (
        # the letters sit mid-sentence in some phrasings, so words after them are not read as letters
        "Reverse the letters: {w}", "Write these letters in reverse order: {w}",
        "Give the letters {w} backwards.", "Put {w} in reverse order.", "Take the letters {w} and reverse them.",
        "What are the letters {w} in reverse?", "Read these letters from last to first: {w}",
    ), make_reverse, norm_letters, 16),
    Task("sort_letters", "strings", "Sort a sequence of letters into alphabetical order.", (
        "Sort these letters alphabetically: {w}", "Put the letters in alphabetical order: {w}",
        "Arrange {w} in alphabetical order.", "Alphabetize the letters: {w}",
        "Sort the letters {w} alphabetically, please.",
        "What are the letters {w} in alphabetical order?", "Order these letters alphabetically: {w}",
    ), make_sort, norm_letters, 16),
    Task("caesar_shift", "strings", "Shift every letter one place forward in the alphabet (Caesar cipher).", (
        "Shift each letter forward by one: {w}", "Apply a Caesar shift of 1 to: {w}",
        "Encode {w} with a Caesar cipher of shift one.", "Replace each letter with the next letter: {w}",
        "Caesar shift by 1: {w}",
        "Move every letter one step forward in the alphabet: {w}", "Encrypt {w} using a shift of 1.",
    ), make_caesar, norm_letters, 16),
    Task("iso_date_to_text", "formats", "Rewrite an ISO date (YYYY-MM-DD) as 'Month D, YYYY'.", (
        "Write the date {d} in words.", "Convert {d} to the format Month D, YYYY.",
        "Format the date {d} as a US-style long date.", "Rewrite {d} as month name, day, year.",
        "Long date for {d}?",
        "How would you write {d} with the month spelled out?", "Express the ISO date {d} in long form.",
    ), make_date, norm_text, 12),
    Task("time_24h_to_12h", "formats", "Convert a 24-hour clock time to 12-hour time with AM/PM.", (
        "Convert {t} to 12-hour time.", "What is {t} in AM/PM format?",
        "Write the time {t} on a 12-hour clock.",
        "Change {t} from 24-hour to 12-hour format.", "12-hour time for {t}?",
        "How do you say {t} with AM or PM?", "Express {t} in 12-hour notation.",
    ), make_time, norm_time, 8),
    Task("kv_to_json", "formats", "Turn 'key: value' lines into a JSON object.", (
        "Convert to JSON:\n{lines}", "Turn these key-value lines into a JSON object:\n{lines}",
        "Write this record as JSON:\n{lines}", "JSON for:\n{lines}", "Make a JSON object from:\n{lines}",
        "Represent the following as a JSON object:\n{lines}", "Encode these fields as JSON:\n{lines}",
    ), make_kv_json, norm_json, 24),
    Task("review_sentiment", "classification", "Say whether a product review is positive or negative.", (
        "Is this review positive or negative? {review}", "Classify the sentiment: {review}",
        "Sentiment of this review (positive/negative): {review}", "{review} Positive or negative?",
        "Label the review as positive or negative: {review}",
        "What is the sentiment of the following review? {review}", "Does this customer like the product? "
        "Answer positive or negative. {review}",
    ), make_sentiment, norm_text, 4),
    Task("odd_or_even", "classification", "Say whether an integer is odd or even.", (
        "Is {n} odd or even?", "Odd or even: {n}", "Tell me whether {n} is even or odd.",
        "Classify {n} as odd or even.", "{n}: even or odd?",
        "Is the number {n} even or is it odd?", "Determine the parity of {n} (odd/even).",
    ), make_parity, norm_text, 4),
    Task("count_vowels", "classification", "Count the vowels in a sequence of letters.", (
        "How many vowels are in: {w}", "Count the vowels: {w}", "Number of vowels in {w}?",
        "How many of these letters are vowels? {w}", "Vowel count of {w}?",
        "Count how many vowels appear in {w}.", "Tell me the number of vowels in the letters {w}.",
    ), make_vowels, norm_number, 4),
)
TASKS: dict[str, Task] = {t.name: t for t in TASK_LIST}


def task_library(adapters_dir: Path) -> dict[str, str]:
    """task -> adapter name, for the adapters whose card names a task of the generators; where
    several do (a task's LoRA and its MELoRA twin), the one named after the task."""
    library = {}
    for name, path in adapter_dirs(adapters_dir).items():
        task = read_card(path).get("task")
        if task in TASKS and library.get(task) != task:
            library[task] = name
    return library
