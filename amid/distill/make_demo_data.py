"""Generate the shipped demo instruction set: ``amid/data/demo_{train,validation,test}.jsonl``.

Every record is ``{"prompt", "response", "answer", "task"}``. The tasks are chosen so that the
answer can be checked by a program (arithmetic, string operations, unit conversion, counting,
ordering) or is a simple fact stated in the file itself (capitals, opposites, plurals, legs of
animals, days and months). Responses are one short sentence in a fixed style, so greedy CPU
generation stays fast and exact match is meaningful.

The three splits share no prompt. For the fact tasks the entities are split as well (a country
in the test split never appears in train), so the test set also measures what the student gets
from the teacher rather than from memorising the train split.

Run ``python -m amid.distill.make_demo_data`` to rewrite the files (deterministic: seed 2026).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Callable, Dict, List, Sequence, Tuple

Record = Dict[str, str]

# ------------------------------------------------------------------------------------------------
# Word lists (written for this project).

WORDS = [
    "apple", "river", "garden", "planet", "window", "candle", "forest", "bottle", "pencil", "rocket",
    "silver", "market", "winter", "summer", "yellow", "orange", "basket", "castle", "dragon", "island",
    "jacket", "kitten", "ladder", "mirror", "number", "oyster", "pepper", "rabbit", "saddle", "tunnel",
    "velvet", "wallet", "button", "cookie", "doctor", "engine", "finger", "guitar", "hammer", "insect",
    "jungle", "lemon", "magnet", "needle", "orbit", "parrot", "puzzle", "ribbon", "spider", "ticket",
    "violin", "walrus", "zebra", "anchor", "banana", "carpet", "desert", "falcon", "glider", "harbor",
    "igloo", "kettle", "lizard", "meadow", "napkin", "pillow", "quartz", "saturn", "tomato", "umbrella",
    "vessel", "wizard", "bridge", "cloud", "stone", "light", "music", "table", "chair", "grape",
    "house", "tiger", "horse", "train", "paper", "water", "bread", "clock", "piano", "ocean",
    "sugar", "plant", "smile", "storm", "beach", "green", "money", "tower", "honey", "sheep",
]

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Australia", "Canberra"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Ukraine", "Kyiv"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Colombia", "Bogota"), ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"), ("Iceland", "Reykjavik"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("full", "empty"), ("early", "late"), ("young", "old"), ("strong", "weak"),
    ("wet", "dry"), ("hard", "soft"), ("high", "low"), ("rich", "poor"), ("loud", "quiet"), ("near", "far"),
    ("thick", "thin"), ("clean", "dirty"), ("long", "short"), ("heavy", "light"), ("true", "false"),
    ("inside", "outside"), ("day", "night"), ("left", "right"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("first", "last"), ("safe", "dangerous"), ("sweet", "sour"), ("wide", "narrow"),
]

PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
    ("foot", "feet"), ("tooth", "teeth"), ("man", "men"), ("woman", "women"), ("city", "cities"),
    ("baby", "babies"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("bus", "buses"),
    ("glass", "glasses"), ("dish", "dishes"), ("goose", "geese"), ("person", "people"), ("potato", "potatoes"),
    ("hero", "heroes"), ("story", "stories"), ("party", "parties"), ("book", "books"), ("car", "cars"),
    ("church", "churches"), ("fox", "foxes"), ("life", "lives"), ("wife", "wives"), ("ox", "oxen"),
]

LEGS = [
    ("dog", 4), ("cat", 4), ("horse", 4), ("cow", 4), ("spider", 8), ("ant", 6), ("bee", 6), ("chicken", 2),
    ("duck", 2), ("octopus", 8), ("beetle", 6), ("goat", 4), ("sheep", 4), ("ostrich", 2), ("penguin", 2),
    ("crab", 10), ("lion", 4), ("tiger", 4), ("fly", 6), ("parrot", 2), ("elephant", 4), ("scorpion", 8),
    ("butterfly", 6), ("pig", 4), ("kangaroo", 2), ("owl", 2),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

# (from unit, to unit, factor): to = from * factor.
CONVERSIONS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000),
    ("feet", "inches", 12), ("days", "hours", 24), ("weeks", "days", 7), ("yards", "feet", 3),
    ("centimeters", "millimeters", 10), ("dozens", "items", 12),
]

# ------------------------------------------------------------------------------------------------
# Task generators: each returns (prompt, response, answer) from a random generator (and, for the
# fact tasks, from the entities allowed in the split).


def _add(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", str(a + b)


def _sub(rng: random.Random) -> Tuple[str, str, str]:
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", str(a - b)


def _mul(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b)


def _reverse(rng: random.Random, words: Sequence[str]) -> Tuple[str, str, str]:
    w = rng.choice(words)
    return f'Reverse the word "{w}".', f'The reverse of "{w}" is "{w[::-1]}".', w[::-1]


def _upper(rng: random.Random, words: Sequence[str]) -> Tuple[str, str, str]:
    w = rng.choice(words)
    return f'Write the word "{w}" in uppercase.', f'"{w}" in uppercase is "{w.upper()}".', w.upper()


def _count(rng: random.Random, words: Sequence[str]) -> Tuple[str, str, str]:
    w = rng.choice(words)
    return (f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.', str(len(w)))


def _first_letter(rng: random.Random, words: Sequence[str]) -> Tuple[str, str, str]:
    w = rng.choice(words)
    return (f'What is the first letter of the word "{w}"?', f'The first letter of "{w}" is "{w[0]}".', w[0])


def _convert(rng: random.Random) -> Tuple[str, str, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    x = rng.randint(2, 15)
    return f"Convert {x} {src} to {dst}.", f"{x} {src} is {x * factor} {dst}.", str(x * factor)


def _larger(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.sample(range(10, 100), 2)
    hi, lo = max(a, b), min(a, b)
    return f"Which is larger, {a} or {b}?", f"{hi} is larger than {lo}.", str(hi)


def _sort(rng: random.Random) -> Tuple[str, str, str]:
    xs = rng.sample(range(1, 50), 3)
    s = ", ".join(str(x) for x in sorted(xs))
    return (f"Sort these numbers from smallest to largest: {', '.join(str(x) for x in xs)}.",
            f"The sorted numbers are {s}.", s)


def _parity(rng: random.Random) -> Tuple[str, str, str]:
    n = rng.randint(1, 200)
    kind = "even" if n % 2 == 0 else "odd"
    return f"Is {n} even or odd?", f"{n} is {kind}.", kind


def _capital(rng: random.Random, items: Sequence[Tuple[str, str]]) -> Tuple[str, str, str]:
    country, city = rng.choice(items)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}.", city


def _opposite(rng: random.Random, items: Sequence[Tuple[str, str]]) -> Tuple[str, str, str]:
    w, o = rng.choice(items)
    return f'What is the opposite of "{w}"?', f'The opposite of "{w}" is "{o}".', o


def _plural(rng: random.Random, items: Sequence[Tuple[str, str]]) -> Tuple[str, str, str]:
    w, p = rng.choice(items)
    return f'What is the plural of "{w}"?', f'The plural of "{w}" is "{p}".', p


def _legs(rng: random.Random, items: Sequence[Tuple[str, int]]) -> Tuple[str, str, str]:
    animal, n = rng.choice(items)
    return f"How many legs does a {animal} have?", f"A {animal} has {n} legs.", str(n)


def _next_day(rng: random.Random) -> Tuple[str, str, str]:
    i = rng.randrange(7)
    return (f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.",
            DAYS[(i + 1) % 7])


def _next_month(rng: random.Random) -> Tuple[str, str, str]:
    i = rng.randrange(12)
    return (f"What month comes after {MONTHS[i]}?", f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}.",
            MONTHS[(i + 1) % 12])


def _split_items(items: Sequence, rng: random.Random, fractions: Tuple[float, float]) -> List[List]:
    """Split entities into disjoint train / validation / test pools."""
    items = list(items)
    rng.shuffle(items)
    n_val = max(2, int(len(items) * fractions[0]))
    n_test = max(2, int(len(items) * fractions[1]))
    return [items[n_val + n_test:], items[:n_val], items[n_val:n_val + n_test]]


def make_splits(n_train: int = 400, n_val: int = 50, n_test: int = 50, seed: int = 2026) -> List[List[Record]]:
    """Build the three splits (no prompt shared between them)."""
    rng = random.Random(seed)
    pools = {name: _split_items(items, rng, (0.15, 0.15))
             for name, items in (("words", WORDS), ("capitals", CAPITALS), ("opposites", OPPOSITES),
                                 ("plurals", PLURALS), ("legs", LEGS))}
    tasks: List[Tuple[str, Callable[[random.Random, int], Tuple[str, str, str]]]] = [
        ("addition", lambda r, s: _add(r)),
        ("subtraction", lambda r, s: _sub(r)),
        ("multiplication", lambda r, s: _mul(r)),
        ("reverse", lambda r, s: _reverse(r, pools["words"][s])),
        ("uppercase", lambda r, s: _upper(r, pools["words"][s])),
        ("count_letters", lambda r, s: _count(r, pools["words"][s])),
        ("first_letter", lambda r, s: _first_letter(r, pools["words"][s])),
        ("unit_conversion", lambda r, s: _convert(r)),
        ("compare", lambda r, s: _larger(r)),
        ("sort", lambda r, s: _sort(r)),
        ("parity", lambda r, s: _parity(r)),
        ("capital", lambda r, s: _capital(r, pools["capitals"][s])),
        ("opposite", lambda r, s: _opposite(r, pools["opposites"][s])),
        ("plural", lambda r, s: _plural(r, pools["plurals"][s])),
        ("legs", lambda r, s: _legs(r, pools["legs"][s])),
        ("next_day", lambda r, s: _next_day(r)),
        ("next_month", lambda r, s: _next_month(r)),
    ]
    seen: set = set()
    splits: List[List[Record]] = [[], [], []]
    # Validation and test first, so that train is the split that skips the (few) collisions.
    for split, target in ((1, n_val), (2, n_test), (0, n_train)):
        tries = 0
        while len(splits[split]) < target:
            tries += 1
            if tries > 100 * target:
                raise RuntimeError(f"make_demo_data: could not draw {target} distinct prompts for split {split}")
            name, fn = tasks[len(splits[split]) % len(tasks)] if tries % 7 else rng.choice(tasks)
            prompt, response, answer = fn(rng, split)
            if prompt in seen:
                continue
            seen.add(prompt)
            splits[split].append({"prompt": prompt, "response": response, "answer": answer, "task": name})
        rng.shuffle(splits[split])
    return splits


def write_jsonl(path: str, records: Sequence[Record]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                          "data"))
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--validation", type=int, default=50)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    splits = make_splits(args.train, args.validation, args.test, args.seed)
    for name, recs in zip(("train", "validation", "test"), splits):
        path = os.path.join(args.out_dir, f"demo_{name}.jsonl")
        write_jsonl(path, recs)
        print(f"wrote {len(recs)} records to {path}")


if __name__ == "__main__":
    main()
