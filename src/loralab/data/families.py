"""The instruction suite's task families: each a generator from a `random.Random` to one
(instruction, input, output) record with a single exact answer.

A family varies its wording (a few phrasings each), so a model learns the skill rather than one
template; its answer is one short line, scored by exact match. Generators are pure functions of
the random stream they are given: the same stream gives the same record (suite.py seeds the
streams and keeps train and test apart). The word lists below are the only vocabulary they use.
"""
from __future__ import annotations

import random
from collections.abc import Callable

# (instruction, input, output, key): input "" when the instruction says it all; key names the content
# that fixes the answer (not the wording), so a held-out item is never trained on in another phrasing.
Record = tuple[str, str, str, str]

WORDS = (
    "apple", "river", "garden", "window", "pencil", "rocket", "silver", "planet", "candle", "forest",
    "button", "dragon", "marble", "pepper", "ladder", "tunnel", "orange", "bridge", "castle", "mirror",
    "violin", "basket", "carpet", "helmet", "jacket", "kettle", "lemon", "magnet", "napkin", "pillow",
    "rabbit", "saddle", "tomato", "wallet", "anchor", "blanket", "cactus", "dolphin", "engine", "falcon",
    "guitar", "harbor", "island", "jungle", "kitten", "lantern", "meadow", "needle", "oyster", "parrot",
    "puzzle", "quartz", "ribbon", "shadow", "timber", "umbrella", "velvet", "walnut", "yogurt", "zipper",
    "cloud", "stone", "bread", "chair", "table", "light", "music", "paper", "water", "green",
    "school", "summer", "winter", "spring", "autumn", "market", "letter", "number", "doctor", "farmer",
    "pocket", "rain", "snow", "storm", "valley", "desert", "ocean", "beach", "cheese", "butter",
    "coffee", "sugar", "honey", "salad", "noodle", "pizza", "cookie", "muffin", "carrot", "potato",
    "tiger", "zebra", "horse", "mouse", "eagle", "spider", "turtle", "monkey", "penguin", "giraffe",
    "yellow", "purple", "bright", "quiet", "gentle", "simple", "happy", "little", "golden", "wooden",
)
SENTENCE_WORDS = ("the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "big", "small", "red",
                  "blue", "quickly", "slowly", "jumped", "over", "fence", "and", "then", "slept", "house", "near")
NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo",
         "Maya", "Nils", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor")
ITEMS = ("apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "coins", "cards")
METRIC_UNITS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
                ("liters", "milliliters", 1000), ("centimeters", "millimeters", 10))
TIME_UNITS = (("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7))
DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def _word(rng: random.Random) -> str:
    """A listed word, or (half the time) a made-up one of 2-3 syllables: enough distinct words for
    thousands of string-edit items."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def _phrase(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(lo, hi)))


def _numbers(rng: random.Random, k: int, hi: int = 99) -> list[int]:
    return rng.sample(range(hi + 1), k)  # distinct: a largest / a sorted order is unambiguous


def _listed(values) -> str:
    return ", ".join(map(str, values))


# --- arithmetic ----------------------------------------------------------------------------------

def add(rng):
    a, b = rng.randrange(1000), rng.randrange(1000)
    q = rng.choice((f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."))
    return q, "", str(a + b), f"{a}+{b}"


def subtract(rng):
    a, b = rng.randrange(1000), rng.randrange(1000)
    q = rng.choice((f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"Compute {a} - {b}."))
    return q, "", str(a - b), f"{a}-{b}"


def multiply(rng):
    a, b = rng.randrange(1000), rng.randint(2, 9)
    q = rng.choice((f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"Compute {a} * {b}."))
    return q, "", str(a * b), f"{a}*{b}"


def divide(rng):
    b, answer = rng.randint(2, 9), rng.randrange(1000)
    q = rng.choice((f"What is {answer * b} divided by {b}?", f"Divide {answer * b} by {b}."))
    return q, "", str(answer), f"{answer * b}/{b}"


# --- comparisons ---------------------------------------------------------------------------------

def larger(rng):
    a, b = _numbers(rng, 2, 999)
    q = rng.choice((f"Which is larger: {a} or {b}?", f"Which number is bigger, {a} or {b}?"))
    return q, "", str(max(a, b)), f"{a},{b}"


def smaller(rng):
    a, b = _numbers(rng, 2, 999)
    q = rng.choice((f"Which is smaller: {a} or {b}?", f"Which number is less, {a} or {b}?"))
    return q, "", str(min(a, b)), f"{a},{b}"


def max_of_list(rng):
    values = _numbers(rng, rng.randint(3, 6))
    q = rng.choice(("What is the largest number in this list?", "Find the maximum of these numbers."))
    return q, _listed(values), str(max(values)), _listed(values)


def even_odd(rng):
    n = rng.randrange(10_000)
    q = rng.choice((f"Is {n} even or odd?", f"Is the number {n} odd or even?"))
    return q, "", "even" if n % 2 == 0 else "odd", str(n)


# --- counting ------------------------------------------------------------------------------------

def count_letter(rng):
    word = _word(rng)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("chjqwxy")
    q = rng.choice((f"How many times does the letter '{letter}' appear in '{word}'?",
                    f"Count the letter '{letter}' in the word '{word}'."))
    return q, "", str(word.count(letter)), f"{letter}:{word}"


def count_words(rng):
    sentence = " ".join(rng.choice(SENTENCE_WORDS) for _ in range(rng.randint(3, 9)))
    q = rng.choice(("How many words are in this sentence?", "Count the words in the following text."))
    return q, sentence, str(len(sentence.split())), sentence


def count_items(rng):
    items = rng.sample(WORDS, rng.randint(2, 8))
    q = rng.choice(("How many items are in this list?", "Count the items in the following list."))
    return q, _listed(items), str(len(items)), _listed(items)


# --- string edits --------------------------------------------------------------------------------

def reverse_word(rng):
    word = _word(rng)
    q = rng.choice((f"Reverse the word '{word}'.", f"Spell '{word}' backwards."))
    return q, "", word[::-1], word


def uppercase(rng):
    text = _phrase(rng)
    q = rng.choice(("Write the following in uppercase.", "Convert this text to capital letters."))
    return q, text, text.upper(), text


def lowercase(rng):
    text = _phrase(rng).upper()
    q = rng.choice(("Write the following in lowercase.", "Convert this text to small letters."))
    return q, text, text.lower(), text


def first_letters(rng):
    text = _phrase(rng, 3, 5)
    q = rng.choice(("Write the first letter of each word, with no spaces.",
                    "Join the initial letters of these words."))
    return q, text, "".join(w[0] for w in text.split()), text


# --- unit conversions ----------------------------------------------------------------------------

def _convert(rng, table):
    big, small, factor = rng.choice(table)
    a = rng.randint(1, 999)
    q = rng.choice((f"Convert {a} {big} to {small}.", f"How many {small} are in {a} {big}?"))
    return q, "", str(a * factor), f"{a} {big}>{small}"


def metric_units(rng):
    return _convert(rng, METRIC_UNITS)


def time_units(rng):
    return _convert(rng, TIME_UNITS)


# --- word problems -------------------------------------------------------------------------------

def word_problem_add(rng):
    name, items, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 60), rng.randint(2, 40)
    q = rng.choice((f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
                    f"There are {a} {items} in a box. {name} adds {b}. How many {items} are in the box?"))
    return q, "", str(a + b), f"{name} {items} {a}+{b}"


def word_problem_sub(rng):
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(5, 90)
    b = rng.randint(1, a)
    q = rng.choice((f"{name} had {a} {items} and gave away {b}. How many {items} are left?",
                    f"A box holds {a} {items}. {name} takes out {b}. How many {items} remain in the box?"))
    return q, "", str(a - b), f"{name} {items} {a}-{b}"


def word_problem_mul(rng):
    name, items, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 12), rng.randint(2, 9)
    q = rng.choice((f"{name} buys {a} bags with {b} {items} in each bag. How many {items} is that in all?",
                    f"{name} sets out {a} rows of {items} with {b} in each row. How many {items} are there?"))
    return q, "", str(a * b), f"{name} {items} {a}*{b}"


# --- formatting ----------------------------------------------------------------------------------

def format_date(rng):
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    date = f"{year}-{month:02d}-{day:02d}"
    q = rng.choice(("Write this date in the format DD/MM/YYYY.", "Rewrite the date as day/month/year (DD/MM/YYYY)."))
    return q, date, f"{day:02d}/{month:02d}/{year}", date


def sort_numbers(rng):
    values = _numbers(rng, rng.randint(3, 4))
    q = rng.choice(("Sort these numbers from smallest to largest.", "Put these numbers in increasing order."))
    return q, _listed(values), _listed(sorted(values)), _listed(values)


def sort_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 4))
    q = rng.choice(("Sort these words alphabetically.", "Put these words in alphabetical order."))
    return q, _listed(words), _listed(sorted(words)), _listed(words)


def next_number(rng):
    start, step = rng.randint(0, 499), rng.randint(2, 15)
    seq = [start + i * step for i in range(4)]
    q = rng.choice(("What number comes next in this sequence?", "Continue the sequence with the next number."))
    return q, _listed(seq), str(start + 4 * step), _listed(seq)


# name -> (kind, generator). The kinds group families in reports; the order is the suite's.
FAMILIES: dict[str, tuple[str, Callable[[random.Random], Record]]] = {
    "add": ("arithmetic", add), "subtract": ("arithmetic", subtract), "multiply": ("arithmetic", multiply),
    "divide": ("arithmetic", divide),
    "larger": ("comparison", larger), "smaller": ("comparison", smaller), "max_of_list": ("comparison", max_of_list),
    "even_odd": ("comparison", even_odd),
    "count_letter": ("counting", count_letter), "count_words": ("counting", count_words),
    "count_items": ("counting", count_items),
    "reverse_word": ("string edit", reverse_word), "uppercase": ("string edit", uppercase),
    "lowercase": ("string edit", lowercase), "first_letters": ("string edit", first_letters),
    "metric_units": ("unit conversion", metric_units), "time_units": ("unit conversion", time_units),
    "word_problem_add": ("word problem", word_problem_add), "word_problem_sub": ("word problem", word_problem_sub),
    "word_problem_mul": ("word problem", word_problem_mul),
    "format_date": ("formatting", format_date), "sort_numbers": ("formatting", sort_numbers),
    "sort_words": ("formatting", sort_words), "next_number": ("formatting", next_number),
}
# Never trained on by the `suite` group: each is a new instruction for a skill the trained families
# practise (divide ~ multiply, smaller ~ larger, lowercase ~ uppercase, ...), so their accuracy
# measures generalisation across instructions, not memory of one task.
HELD_OUT = ("divide", "smaller", "count_items", "lowercase", "time_units", "word_problem_mul", "sort_words")
TRAINED = tuple(f for f in FAMILIES if f not in HELD_OUT)
