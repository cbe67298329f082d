"""Write the alpaca-style example data set: instructions with correct answers, of many kinds and lengths (seeded).

    python examples/alpaca/make_data.py [--rows 999] [--seed 0] [--out examples/alpaca/instructions.json]

A JSON array of ``{"instruction", "input", "output"}`` rows (about 40% with an ``input``): arithmetic and
word problems, unit conversions, facts from small tables (capitals, opposites, plurals, definitions,
short explanations), and text work on an input (sorting, counting, reversing, case, joining, extracting
numbers). Every answer is computed or looked up here, so it is right; answers run from a few words to
a paragraph. Written for ftpipe, used by the tests, the benchmarks and as a general example; the same
seed writes the same file byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
Row = dict[str, str]

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Egypt": "Cairo",
    "Spain": "Madrid",
    "Kenya": "Nairobi",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Canada": "Ottawa",
    "India": "New Delhi",
    "Australia": "Canberra",
    "Germany": "Berlin",
    "Ecuador": "Quito",
    "Vietnam": "Hanoi",
    "Austria": "Vienna",
    "Ghana": "Accra",
    "Czechia": "Prague",
    "Chile": "Santiago",
    "Finland": "Helsinki",
    "Turkey": "Ankara",
    "Philippines": "Manila",
    "Switzerland": "Bern",
    "Colombia": "Bogota",
    "Poland": "Warsaw",
    "Italy": "Rome",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "early": "late",
    "happy": "sad",
    "light": "dark",
    "fast": "slow",
    "open": "closed",
    "full": "empty",
    "strong": "weak",
    "rich": "poor",
    "young": "old",
    "loud": "quiet",
    "hard": "soft",
    "high": "low",
    "wet": "dry",
    "clean": "dirty",
    "push": "pull",
    "buy": "sell",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "tooth": "teeth",
    "goose": "geese",
    "man": "men",
    "woman": "women",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "city": "cities",
    "box": "boxes",
    "bus": "buses",
    "sheep": "sheep",
    "fish": "fish",
    "cactus": "cacti",
    "analysis": "analyses",
    "half": "halves",
}
DEFINITIONS = {
    "photosynthesis": "Photosynthesis is the process by which plants, algae and some bacteria use sunlight, water and carbon dioxide to make sugar and release oxygen.",
    "gravity": "Gravity is the force by which masses attract each other; it keeps us on the ground and the planets in orbit around the Sun.",
    "democracy": "Democracy is a system of government in which citizens choose their leaders and laws, usually through free and fair elections.",
    "inflation": "Inflation is the general rise of prices over time, which means that the same amount of money buys less than before.",
    "an algorithm": "An algorithm is a finite sequence of well-defined steps that solves a problem or performs a computation.",
    "a metaphor": "A metaphor is a figure of speech that describes something by saying it is something else, such as 'time is a thief'.",
    "evaporation": "Evaporation is the change of a liquid into a gas at its surface, as when puddles dry in the sun.",
    "a noun": "A noun is a word that names a person, place, thing or idea, such as 'teacher', 'city' or 'freedom'.",
    "an ecosystem": "An ecosystem is a community of living things together with their physical environment, interacting as a system.",
    "a prime number": "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7.",
}
EXPLANATIONS = {
    "why the sky is blue": [
        "Sunlight is made of many colours of light.",
        "When it passes through the atmosphere, the short blue wavelengths are scattered by air molecules much more than the long red ones.",
        "This scattered blue light reaches our eyes from every direction of the sky.",
        "At sunrise and sunset the light travels through more air, the blue is scattered away, and the sky looks red and orange.",
    ],
    "how vaccines work": [
        "A vaccine shows the immune system a harmless piece or copy of a germ.",
        "The body responds by making antibodies and memory cells against it.",
        "If the real germ arrives later, the immune system recognises it and fights it off quickly.",
        "This is why vaccinated people get sick less often or less severely.",
    ],
    "what causes the seasons": [
        "The Earth's axis is tilted by about 23.5 degrees.",
        "As the Earth orbits the Sun, each hemisphere leans towards the Sun for part of the year and away from it for another part.",
        "Leaning towards the Sun means longer days and more direct sunlight, which is summer.",
        "Leaning away means shorter days and slanted sunlight, which is winter.",
    ],
    "how a bicycle stays upright": [
        "A moving bicycle is balanced mostly by steering.",
        "When it starts to lean, the rider, and the geometry of the front fork, turn the wheel towards the lean.",
        "This moves the wheels back under the centre of mass.",
        "The faster the bicycle goes, the smaller and quicker these corrections can be.",
    ],
    "why we recycle": [
        "Recycling turns used materials into new products.",
        "It saves raw materials such as wood, oil and metal ore.",
        "It usually needs less energy than making things from scratch.",
        "It also keeps waste out of landfills and the sea.",
    ],
    "how the heart pumps blood": [
        "The heart has four chambers: two atria on top and two ventricles below.",
        "The right side receives blood from the body and pumps it to the lungs to pick up oxygen.",
        "The left side receives the oxygen-rich blood and pumps it out to the whole body.",
        "Valves between the chambers keep the blood flowing in one direction.",
    ],
}
THINGS = {
    "fruits": ["apple", "banana", "cherry", "mango", "pear", "grape", "orange", "kiwi", "peach", "plum"],
    "colours": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "animals": ["dog", "cat", "horse", "eagle", "dolphin", "lion", "rabbit", "owl", "frog", "bear"],
    "vegetables": [
        "carrot",
        "onion",
        "potato",
        "spinach",
        "pepper",
        "leek",
        "cabbage",
        "pea",
        "bean",
        "corn",
    ],
    "musical instruments": ["piano", "violin", "guitar", "flute", "drum", "trumpet", "cello", "harp", "oboe"],
}
FRENCH = {
    "cat": "chat",
    "dog": "chien",
    "house": "maison",
    "water": "eau",
    "bread": "pain",
    "book": "livre",
    "tree": "arbre",
    "sun": "soleil",
    "car": "voiture",
    "friend": "ami",
    "school": "école",
    "milk": "lait",
}
WORDS = [
    "river",
    "garden",
    "window",
    "planet",
    "lantern",
    "harbor",
    "meadow",
    "pencil",
    "orchard",
    "canyon",
    "blanket",
    "violin",
    "compass",
    "thunder",
    "marble",
    "saddle",
    "glacier",
    "ribbon",
    "bottle",
    "island",
    "feather",
    "engine",
    "castle",
    "pepper",
    "silver",
    "candle",
    "forest",
    "rocket",
    "mirror",
    "tunnel",
]
SUBJECTS = [
    "The old dog",
    "My neighbour",
    "A small bird",
    "The young engineer",
    "Our teacher",
    "The busy chef",
    "A quiet student",
    "The tall tree",
    "The river",
    "An old friend",
]
VERBS = [
    "walks along",
    "looks at",
    "talks about",
    "waits near",
    "paints",
    "cleans",
    "visits",
    "remembers",
    "follows",
    "watches",
]
OBJECTS = [
    "the bright harbor",
    "a quiet garden",
    "the long road",
    "an empty station",
    "the blue door",
    "a busy market",
    "the cold river",
    "a small village",
    "the new bridge",
    "an open window",
]


def sentence(r: random.Random) -> str:
    return f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(OBJECTS)}."


def arithmetic(r: random.Random) -> Row:
    a, b = r.randint(2, 999), r.randint(2, 999)
    op = r.choice(["+", "-", "*"])
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = {"+": "plus", "-": "minus", "*": "times"}[op]
    text = r.choice([f"What is {a} {shown} {b}?", f"Calculate {a} {op} {b}.", f"Compute {a} {op} {b}."])
    return {"instruction": text, "input": "", "output": f"{a} {op} {b} = {result}."}


def word_problem(r: random.Random) -> Row:
    price, count = r.randint(2, 40), r.randint(2, 12)
    item = r.choice(["books", "pens", "tickets", "apples", "notebooks", "cups of coffee"])
    return {
        "instruction": f"If one of the {item} costs ${price} and you buy {count}, how much do you pay in total?",
        "input": "",
        "output": f"You pay ${price * count} in total, because {count} x ${price} = ${price * count}.",
    }


def temperature(r: random.Random) -> Row:
    c = r.randint(-30, 45)
    f = c * 9 / 5 + 32
    return {
        "instruction": "Convert the temperature from Celsius to Fahrenheit.",
        "input": f"{c} degrees Celsius",
        "output": f"{c} degrees Celsius is {f:g} degrees Fahrenheit (F = C x 9/5 + 32).",
    }


def capital(r: random.Random) -> Row:
    country = r.choice(sorted(CAPITALS))
    text = r.choice(
        [
            f"What is the capital of {country}?",
            f"Name the capital city of {country}.",
            f"Which city is the capital of {country}?",
        ]
    )
    return {"instruction": text, "input": "", "output": f"The capital of {country} is {CAPITALS[country]}."}


def opposite(r: random.Random) -> Row:
    word = r.choice(sorted(OPPOSITES))
    return {
        "instruction": "Give the opposite of the word.",
        "input": word,
        "output": f"The opposite of '{word}' is '{OPPOSITES[word]}'.",
    }


def plural(r: random.Random) -> Row:
    word = r.choice(sorted(PLURALS))
    return {
        "instruction": f"What is the plural of '{word}'?",
        "input": "",
        "output": f"The plural of '{word}' is '{PLURALS[word]}'.",
    }


def define(r: random.Random) -> Row:
    term = r.choice(sorted(DEFINITIONS))
    return {
        "instruction": r.choice([f"Define {term}.", f"What is {term}?", f"Explain what {term} means."]),
        "input": "",
        "output": DEFINITIONS[term],
    }


def explain(r: random.Random) -> Row:
    topic = r.choice(sorted(EXPLANATIONS))
    return {
        "instruction": f"Explain {topic} in a short paragraph.",
        "input": "",
        "output": " ".join(EXPLANATIONS[topic]),
    }


def list_things(r: random.Random) -> Row:
    kind = r.choice(sorted(THINGS))
    n = r.randint(3, 6)
    items = r.sample(THINGS[kind], n)
    return {
        "instruction": f"Name {n} {kind}.",
        "input": "",
        "output": ", ".join(items[:-1]) + f" and {items[-1]}.",
    }


def translate(r: random.Random) -> Row:
    word = r.choice(sorted(FRENCH))
    return {
        "instruction": "Translate the word into French.",
        "input": word,
        "output": f"'{word}' in French is '{FRENCH[word]}'.",
    }


def sort_numbers(r: random.Random) -> Row:
    numbers = [r.randint(1, 500) for _ in range(r.randint(4, 16))]
    order = r.choice(["ascending", "descending"])
    result = sorted(numbers, reverse=order == "descending")
    return {
        "instruction": f"Sort these numbers in {order} order.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, result)),
    }


def sort_words(r: random.Random) -> Row:
    words = r.sample(WORDS, r.randint(4, 18))
    return {
        "instruction": "Sort these words alphabetically.",
        "input": " ".join(words),
        "output": " ".join(sorted(words)),
    }


def count_words(r: random.Random) -> Row:
    text = " ".join(sentence(r) for _ in range(r.randint(1, 4)))
    return {
        "instruction": "How many words are in this text?",
        "input": text,
        "output": f"The text has {len(text.split())} words.",
    }


def reverse_word(r: random.Random) -> Row:
    word = r.choice(WORDS)
    return {"instruction": "Write the word backwards.", "input": word, "output": word[::-1]}


def upper(r: random.Random) -> Row:
    text = sentence(r)
    return {"instruction": "Rewrite the sentence in capital letters.", "input": text, "output": text.upper()}


def join_sentences(r: random.Random) -> Row:
    sentences = [sentence(r) for _ in range(r.randint(3, 8))]
    return {
        "instruction": "Join these sentences into one paragraph.",
        "input": "\n".join(sentences),
        "output": " ".join(sentences),
    }


def extract_numbers(r: random.Random) -> Row:
    numbers = [r.randint(1, 2000) for _ in range(r.randint(2, 5))]
    parts = [f"{sentence(r)[:-1]} {n} times." for n in numbers]
    text = " ".join(parts)
    found = re.findall(r"\d+", text)
    return {
        "instruction": "List every number that appears in the text.",
        "input": text,
        "output": ", ".join(found),
    }


def count_letter(r: random.Random) -> Row:
    word = r.choice(WORDS)
    letter = r.choice(sorted(set(word)))
    n = word.count(letter)
    return {
        "instruction": f"How many times does the letter '{letter}' appear in '{word}'?",
        "input": "",
        "output": f"The letter '{letter}' appears {n} time{'s' if n != 1 else ''} in '{word}'.",
    }


def even_odd(r: random.Random) -> Row:
    n = r.randint(0, 100000)
    return {
        "instruction": "Is the number even or odd?",
        "input": str(n),
        "output": f"{n} is {'even' if n % 2 == 0 else 'odd'}.",
    }


KINDS: list[tuple[Callable[[random.Random], Row], int]] = [
    (arithmetic, 8),
    (word_problem, 5),
    (temperature, 5),
    (capital, 7),
    (opposite, 5),
    (plural, 5),
    (define, 7),
    (explain, 8),
    (list_things, 6),
    (translate, 4),
    (sort_numbers, 5),
    (sort_words, 5),
    (count_words, 5),
    (reverse_word, 3),
    (upper, 4),
    (join_sentences, 5),
    (extract_numbers, 4),
    (count_letter, 4),
    (even_odd, 3),
]


def rows(n: int, seed: int) -> list[Row]:
    r = random.Random(seed)
    makers, weights = zip(*KINDS, strict=True)
    return [r.choices(makers, weights=weights)[0](r) for _ in range(n)]


def write(path: Path, n: int, seed: int) -> Path:
    path.write_text(json.dumps(rows(n, seed), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "instructions.json")
    args = parser.parse_args()
    print(write(args.out, args.rows, args.seed))


if __name__ == "__main__":
    main()
