"""Write the preference example data set: answers that open with "In short:" are preferred (seeded).

    python examples/preference/make_data.py [--seed 0] [--out examples/preference/pairs.jsonl]
        [--heldout examples/preference/heldout_prompts.jsonl]

The property: the chosen answer opens with the words ``In short:`` and then answers; the rejected
answer is exactly the same text without them, so the only preference signal is the property.
``property.py`` beside this file checks it (``has_property``); the base SmolLM2-135M-Instruct
practically never opens an answer that way, so a short DPO run that teaches it is visible at once.

Layout: JSON Lines in the explicit-prompt, plain-text preference layout, one pair per line,
``{"prompt": str, "chosen": str, "rejected": str}``; ftpipe renders the prompt with the model's chat
template (``use_chat_template: true``). Prompts are short factual, definition, how-to, arithmetic,
unit, antonym and capital-city questions, each asked through several templates; the answers are
one sentence written from the tables below.

Also writes ``heldout_prompts.jsonl`` (``{"prompt": str}`` lines) for the proof: topics that no
training pair mentions, asked through templates that no training pair uses, plus open "why" and
advice questions of a kind absent from training. Written for ftpipe; nothing is downloaded, and the
same seed writes the same files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "In short: "

# (term with its article, bare term, one-sentence definition)
DEFINITIONS = [
    (
        "a volcano",
        "volcano",
        "A volcano is an opening in the Earth's crust where molten rock, ash and gas escape.",
    ),
    (
        "a glacier",
        "glacier",
        "A glacier is a slow-moving mass of ice formed from snow packed down over many years.",
    ),
    (
        "photosynthesis",
        "photosynthesis",
        "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
    ),
    (
        "an atom",
        "atom",
        "An atom is the smallest unit of a chemical element: a nucleus with electrons around it.",
    ),
    ("a noun", "noun", "A noun is a word that names a person, place, thing or idea."),
    ("a verb", "verb", "A verb is a word that describes an action or a state, such as run or be."),
    ("gravity", "gravity", "Gravity is the force that pulls objects with mass towards each other."),
    (
        "a planet",
        "planet",
        "A planet is a large round body that orbits a star, like the Earth orbits the Sun.",
    ),
    (
        "democracy",
        "democracy",
        "Democracy is a system of government in which citizens choose their leaders by voting.",
    ),
    (
        "inflation",
        "inflation",
        "Inflation is the general rise in prices over time, which lowers what money can buy.",
    ),
    ("a budget", "budget", "A budget is a plan for how much money you will earn and spend over a period."),
    (
        "a mammal",
        "mammal",
        "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk.",
    ),
    (
        "a reptile",
        "reptile",
        "A reptile is a cold-blooded animal with scales, such as a lizard, snake or turtle.",
    ),
    ("erosion", "erosion", "Erosion is the slow wearing away of rock and soil by water, wind or ice."),
    (
        "a recipe",
        "recipe",
        "A recipe is a set of instructions for preparing a dish, with its ingredients and steps.",
    ),
    (
        "a metaphor",
        "metaphor",
        "A metaphor describes something by calling it something else, as in time is money.",
    ),
    ("a simile", "simile", "A simile compares two things using like or as, for example brave as a lion."),
    ("a thermometer", "thermometer", "A thermometer is an instrument that measures temperature."),
    ("a calendar", "calendar", "A calendar is a chart of the days, weeks and months of a year."),
    (
        "a compass",
        "compass",
        "A compass is a tool with a magnetic needle that points north, used to find your way.",
    ),
    (
        "evaporation",
        "evaporation",
        "Evaporation is the change of a liquid into a gas, like a puddle drying in the sun.",
    ),
    ("a vaccine", "vaccine", "A vaccine is a substance that trains the immune system to fight a disease."),
    (
        "a hurricane",
        "hurricane",
        "A hurricane is a large, powerful storm with strong winds that forms over warm seas.",
    ),
    (
        "an algorithm",
        "algorithm",
        "An algorithm is a step-by-step set of instructions for solving a problem.",
    ),
    (
        "a password",
        "password",
        "A password is a secret word or phrase that proves who you are to a computer system.",
    ),
    (
        "a spreadsheet",
        "spreadsheet",
        "A spreadsheet is a grid of rows and columns for organising and calculating data.",
    ),
    ("a habitat", "habitat", "A habitat is the natural home of an animal or plant."),
    (
        "a continent",
        "continent",
        "A continent is one of the Earth's seven large land masses, such as Africa or Asia.",
    ),
    ("an island", "island", "An island is a piece of land surrounded by water on all sides."),
    ("a desert", "desert", "A desert is a dry region that gets very little rain each year."),
    (
        "friction",
        "friction",
        "Friction is the force that resists motion when two surfaces rub against each other.",
    ),
    ("a fraction", "fraction", "A fraction is a number that stands for part of a whole, such as one half."),
    (
        "a prime number",
        "prime number",
        "A prime number is a whole number above 1 that can only be divided by 1 and itself.",
    ),
    ("a triangle", "triangle", "A triangle is a flat shape with three straight sides and three angles."),
    (
        "a haiku",
        "haiku",
        "A haiku is a short Japanese poem of three lines with five, seven and five syllables.",
    ),
    (
        "a museum",
        "museum",
        "A museum is a building where objects of art, history or science are kept and shown.",
    ),
    (
        "a library",
        "library",
        "A library is a place where books and other materials are kept to read or borrow.",
    ),
    (
        "an orchestra",
        "orchestra",
        "An orchestra is a large group of musicians who play instruments together.",
    ),
    ("a carnivore", "carnivore", "A carnivore is an animal that eats mainly meat."),
    ("a herbivore", "herbivore", "A herbivore is an animal that eats only plants."),
    ("a fossil", "fossil", "A fossil is the preserved remains or trace of a plant or animal from long ago."),
    ("an eclipse", "eclipse", "An eclipse happens when one body in space blocks the light of another."),
    ("a molecule", "molecule", "A molecule is a group of atoms bonded together, such as water."),
    (
        "a battery",
        "battery",
        "A battery is a device that stores chemical energy and releases it as electricity.",
    ),
    (
        "a passport",
        "passport",
        "A passport is an official document that proves your identity when you travel.",
    ),
    ("a dictionary", "dictionary", "A dictionary is a book or website that lists words with their meanings."),
    ("a synonym", "synonym", "A synonym is a word that means the same or nearly the same as another word."),
    ("an ecosystem", "ecosystem", "An ecosystem is a community of living things and the place they live in."),
    ("a canyon", "canyon", "A canyon is a deep valley with steep sides, often carved by a river."),
    (
        "a satellite",
        "satellite",
        "A satellite is an object that orbits a planet, like the Moon or a weather satellite.",
    ),
]
DEFINITION_TEMPLATES = [
    "What is {a_term}?",
    "Define {term}.",
    'What does "{term}" mean?',
    "Explain {a_term} in one sentence.",
    "Can you tell me what {a_term} is?",
    "Give me a short definition of {term}.",
    "what's {a_term}",
]

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Russia", "Moscow"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"),
    ("Cuba", "Havana"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
]
CAPITAL_TEMPLATES = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "capital of {country}?",
    "What city serves as the capital of {country}?",
]
CAPITAL_ANSWERS = ["The capital of {country} is {city}.", "{city} is the capital of {country}."]

# (task, how to do it in one sentence)
HOW_TO = [
    ("boil an egg", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    (
        "make a cup of tea",
        "Pour boiling water over a tea bag, let it steep for three to five minutes, then remove it.",
    ),
    (
        "fall asleep faster",
        "Keep a regular bedtime, avoid screens for an hour before bed, and keep the room dark.",
    ),
    (
        "remember new words",
        "Review them a few times over several days and use each one in a sentence of your own.",
    ),
    (
        "save money each month",
        "Set a budget, move a fixed amount into savings on payday, and cut one regular cost.",
    ),
    (
        "clean a cast iron pan",
        "Rinse it with hot water, scrub with salt, dry it fully and rub in a thin layer of oil.",
    ),
    (
        "keep houseplants alive",
        "Give them enough light, water only when the soil is dry, and use pots that drain.",
    ),
    ("write a good email subject line", "Keep it short and specific, and say what you need in a few words."),
    (
        "start running",
        "Begin with short runs mixed with walking three times a week, adding a few minutes each week.",
    ),
    ("type faster", "Use all ten fingers, keep your eyes on the screen, and practise for ten minutes a day."),
    (
        "stay focused while studying",
        "Put your phone away, work in 25-minute blocks with short breaks, and set one goal.",
    ),
    (
        "cook rice",
        "Rinse one cup of rice, simmer it covered in two cups of water for 15 minutes, then let it rest.",
    ),
    (
        "remove a coffee stain",
        "Blot it quickly, rinse it from the back with cold water, then wash with a little soap.",
    ),
    (
        "change a flat tyre",
        "Loosen the nuts, jack up the car, swap in the spare wheel, then tighten the nuts firmly.",
    ),
    (
        "make a paper airplane",
        "Fold a sheet in half lengthwise, fold the top corners to the middle, then fold the wings.",
    ),
    (
        "reduce stress",
        "Take short walks, breathe slowly for a few minutes, sleep enough and talk to someone you trust.",
    ),
    (
        "drink more water",
        "Carry a water bottle, drink a glass with every meal, and set reminders on your phone.",
    ),
    (
        "back up my photos",
        "Copy them to an external drive and to a cloud service, so you always have two copies.",
    ),
    (
        "make a strong password",
        "Use a long phrase of four or more random words, and never reuse it on another site.",
    ),
    (
        "prepare for a job interview",
        "Research the company, practise common questions, and prepare two of your own.",
    ),
    ("take better photos with my phone", "Clean the lens, use natural light, and follow the rule of thirds."),
    (
        "learn a new language",
        "Practise a little every day, learn common phrases first, and talk with native speakers.",
    ),
    ("get rid of hiccups", "Hold your breath for ten seconds or sip cold water slowly."),
    (
        "keep bread fresh",
        "Store it in a paper bag at room temperature, and freeze the slices you will not eat soon.",
    ),
    ("memorise a speech", "Break it into short parts, learn one part at a time, and rehearse it out loud."),
    ("organise my desk", "Clear it, keep only what you use every day, and give every item a fixed place."),
    ("wake up earlier", "Move your alarm 15 minutes earlier each week and put it across the room."),
    (
        "be more productive",
        "Plan your day the night before, do the hardest task first, and limit distractions.",
    ),
    ("fix a squeaky door", "Put a few drops of oil on the hinges and swing the door a few times."),
    (
        "make pancakes",
        "Mix flour, milk, eggs and a pinch of salt, then cook small ladlefuls in a hot buttered pan.",
    ),
    (
        "plant a tree",
        "Dig a hole twice as wide as the roots, set the tree in, fill with soil, and water it well.",
    ),
    ("calm down before an exam", "Breathe slowly, arrive early, and remind yourself that you have prepared."),
    (
        "write a short story",
        "Pick one character with a clear goal, give them a problem, and end with how it is solved.",
    ),
    (
        "speed up my computer",
        "Close programs you are not using, remove unneeded startup apps, and restart it.",
    ),
    ("keep a conversation going", "Ask open questions, listen closely, and share a short story of your own."),
    (
        "pack a suitcase",
        "Roll your clothes, put heavy items at the bottom, and keep liquids in a sealed bag.",
    ),
    (
        "make friends in a new city",
        "Join a club or class you enjoy, say yes to invitations, and meet people regularly.",
    ),
    (
        "stop procrastinating",
        "Break the task into tiny steps and commit to just five minutes on the first one.",
    ),
    (
        "improve my handwriting",
        "Write slowly, hold the pen loosely, and practise letters on lined paper every day.",
    ),
    (
        "tie my shoelaces",
        "Cross the laces, tuck one under, make a loop, wrap the other lace around it and pull through.",
    ),
]
HOW_TO_TEMPLATES = [
    "How do I {task}?",
    "How can I {task}?",
    "What is the best way to {task}?",
    "Give me a quick tip to {task}.",
    "Any advice on how to {task}?",
    "how to {task}",
]

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("young", "old"),
    ("loud", "quiet"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("clean", "dirty"),
    ("inside", "outside"),
    ("push", "pull"),
    ("win", "lose"),
    ("begin", "end"),
    ("buy", "sell"),
    ("accept", "refuse"),
    ("ancient", "modern"),
    ("brave", "cowardly"),
    ("generous", "selfish"),
    ("thick", "thin"),
    ("true", "false"),
    ("arrive", "leave"),
    ("remember", "forget"),
    ("friend", "enemy"),
    ("increase", "decrease"),
    ("rough", "smooth"),
    ("sharp", "blunt"),
    ("always", "never"),
    ("shallow", "deep"),
]
OPPOSITE_TEMPLATES = [
    'What is the opposite of "{word}"?',
    "Give me an antonym for {word}.",
    "What word means the opposite of {word}?",
    "opposite of {word}?",
    "Which word is the antonym of {word}?",
]
OPPOSITE_ANSWERS = ['The opposite of "{word}" is "{other}".', 'An antonym of "{word}" is "{other}".']

# (question template, answer template, operation); division is kept for the held-out prompts
ARITHMETIC = [
    ("What is {a} plus {b}?", "{a} plus {b} is {r}.", "+"),
    ("Add {a} and {b}.", "{a} plus {b} equals {r}.", "+"),
    ("What is {a} + {b}?", "{a} + {b} = {r}.", "+"),
    ("What is {a} minus {b}?", "{a} minus {b} is {r}.", "-"),
    ("Subtract {b} from {a}.", "{a} minus {b} equals {r}.", "-"),
    ("What is {a} times {b}?", "{a} times {b} is {r}.", "*"),
    ("Multiply {a} by {b}.", "{a} multiplied by {b} is {r}.", "*"),
    ("How much is {a} x {b}?", "{a} x {b} = {r}.", "*"),
]

# (larger unit, smaller unit, how many of the smaller make one larger)
UNITS = [
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("weeks", "days", 7),
    ("years", "months", 12),
    ("kilometres", "metres", 1000),
    ("litres", "millilitres", 1000),
]
UNIT_TEMPLATES = [
    "How many {small} are in {n} {big}?",
    "Convert {n} {big} into {small}.",
    "{n} {big} is how many {small}?",
    "How many {small} make {n} {big}?",
]
UNIT_ANSWERS = ["There are {r} {small} in {n} {big}.", "{n} {big} equals {r} {small}."]

FACTS = [
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain above sea level."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Which organ pumps blood around the body?", "The heart pumps blood around the body."),
    ("How many teeth does an adult usually have?", "An adult usually has 32 teeth."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    ("What is H2O?", "H2O is the chemical formula for water."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    (
        "How many players does a football team have on the pitch?",
        "A football team has eleven players on the pitch.",
    ),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which instrument has black and white keys?", "The piano has black and white keys."),
    (
        "Where do most penguins live?",
        "Most penguins live in the Southern Hemisphere, many around Antarctica.",
    ),
    ("What is the main ingredient in guacamole?", "The main ingredient in guacamole is avocado."),
    ("How many wheels does a tricycle have?", "A tricycle has three wheels."),
    (
        "Which metal is liquid at room temperature?",
        "Mercury is the metal that is liquid at room temperature.",
    ),
    (
        "How long does the Earth take to go around the Sun?",
        "The Earth goes around the Sun in about 365 days.",
    ),
    ("What is the largest mammal?", "The blue whale is the largest mammal."),
    ("How many colours are in a rainbow?", "A rainbow is usually described as having seven colours."),
    ("What is the closest star to the Earth?", "The Sun is the closest star to the Earth."),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong was the first person to walk on the Moon, in 1969.",
    ),
    ("What is the largest country by area?", "Russia is the largest country by area."),
]

# held out: topics that no training pair mentions, asked through templates that no training pair uses
HELDOUT_DEFINITIONS = [
    ("a tornado", "tornado"),
    ("a peninsula", "peninsula"),
    ("a comet", "comet"),
    ("an adjective", "adjective"),
    ("a microscope", "microscope"),
    ("a rainforest", "rainforest"),
]
HELDOUT_DEFINITION_TEMPLATE = "Tell me in a sentence what {a_term} is."
HELDOUT_CAPITALS = [
    "Belgium",
    "the Netherlands",
    "the Czech Republic",
    "Ghana",
    "Colombia",
    "the Philippines",
]
HELDOUT_CAPITAL_TEMPLATE = "Do you know the capital of {country}?"
HELDOUT_HOW_TO = [
    "defrost a freezer",
    "make a smoothie",
    "clean my glasses",
    "learn to juggle",
    "wash a wool sweater",
    "keep a journal",
]
HELDOUT_HOW_TO_TEMPLATE = "What's a simple way to {task}?"
HELDOUT_OPPOSITES = ["cheap", "above", "polite", "question"]
HELDOUT_OPPOSITE_TEMPLATE = 'Tell me a word that is the opposite of "{word}".'
HELDOUT_DIVISIONS = [(56, 8), (81, 9), (120, 10), (45, 5)]
HELDOUT_DIVISION_TEMPLATE = "What is {a} divided by {b}?"
HELDOUT_UNITS = [("days", "hours", 3), ("feet", "inches", 4), ("days", "hours", 5), ("feet", "inches", 2)]
HELDOUT_UNIT_TEMPLATE = "If I have {n} {big}, how many {small} is that?"
HELDOUT_QUESTIONS = [
    "How many legs does an insect have?",
    "What is the chemical symbol for iron?",
    "Who wrote Pride and Prejudice?",
    "What is the smallest planet in our solar system?",
    "Why is the sky blue?",
    "Why do leaves change colour in autumn?",
    "Why do we need sleep?",
    "Why does ice float on water?",
    "What causes rain?",
    "Why do we have seasons?",
    "Suggest a name for a pet goldfish.",
    "Is it better to study in the morning or at night?",
]


def _answers(rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, plain answer) for every training pair, in table order."""
    out: list[tuple[str, str]] = []
    for a_term, term, definition in DEFINITIONS:
        for template in rng.sample(DEFINITION_TEMPLATES, 3):
            out.append((template.format(a_term=a_term, term=term), definition))
    for country, city in CAPITALS:
        for template in rng.sample(CAPITAL_TEMPLATES, 2):
            answer = rng.choice(CAPITAL_ANSWERS).format(country=country, city=city)
            out.append((template.format(country=country), answer))
    for task, how in HOW_TO:
        for template in rng.sample(HOW_TO_TEMPLATES, 2):
            out.append((template.format(task=task), how))
    for word, other in OPPOSITES:
        for template in rng.sample(OPPOSITE_TEMPLATES, 2):
            out.append(
                (template.format(word=word), rng.choice(OPPOSITE_ANSWERS).format(word=word, other=other))
            )
    seen: set[str] = set()
    while len(seen) < 100:
        question, answer, op = rng.choice(ARITHMETIC)
        a, b = (
            (rng.randint(2, 12), rng.randint(2, 12))
            if op == "*"
            else (rng.randint(10, 99), rng.randint(2, 60))
        )
        if op == "-" and b > a:
            a, b = b, a
        prompt = question.format(a=a, b=b)
        if prompt not in seen:
            seen.add(prompt)
            r = a + b if op == "+" else a - b if op == "-" else a * b
            out.append((prompt, answer.format(a=a, b=b, r=r)))
    for big, small, factor in UNITS:
        for n in rng.sample(range(2, 13), 8):
            template, answer = rng.choice(UNIT_TEMPLATES), rng.choice(UNIT_ANSWERS)
            out.append(
                (
                    template.format(n=n, big=big, small=small),
                    answer.format(n=n, big=big, small=small, r=n * factor),
                )
            )
    out.extend(FACTS)
    return out


def pairs(seed: int) -> list[dict[str, str]]:
    """The preference pairs: the chosen answer is the rejected one opened by ``In short:``."""
    rng = random.Random(seed)
    out = [
        {"prompt": prompt, "chosen": PREFIX + answer, "rejected": answer} for prompt, answer in _answers(rng)
    ]
    rng.shuffle(out)
    return out


def heldout_prompts() -> list[str]:
    """Evaluation prompts disjoint from training: held-out topics, templates and question kinds."""
    out = [
        HELDOUT_DEFINITION_TEMPLATE.format(a_term=a_term, term=term) for a_term, term in HELDOUT_DEFINITIONS
    ]
    out += [HELDOUT_CAPITAL_TEMPLATE.format(country=country) for country in HELDOUT_CAPITALS]
    out += [HELDOUT_HOW_TO_TEMPLATE.format(task=task) for task in HELDOUT_HOW_TO]
    out += [HELDOUT_OPPOSITE_TEMPLATE.format(word=word) for word in HELDOUT_OPPOSITES]
    out += [HELDOUT_DIVISION_TEMPLATE.format(a=a, b=b) for a, b in HELDOUT_DIVISIONS]
    out += [HELDOUT_UNIT_TEMPLATE.format(n=n, big=big, small=small) for big, small, n in HELDOUT_UNITS]
    return out + HELDOUT_QUESTIONS


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write(path: Path, seed: int = 0) -> Path:
    """Write the pairs of ``seed`` to ``path`` as JSON Lines; returns ``path``."""
    return _write_jsonl(path, pairs(seed))


def write_heldout(path: Path) -> Path:
    """Write the held-out prompts to ``path`` as ``{"prompt": ...}`` JSON Lines; returns ``path``."""
    return _write_jsonl(path, [{"prompt": prompt} for prompt in heldout_prompts()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "pairs.jsonl")
    parser.add_argument("--heldout", type=Path, default=HERE / "heldout_prompts.jsonl")
    args = parser.parse_args()
    print(write(args.out, args.seed))
    print(write_heldout(args.heldout))


if __name__ == "__main__":
    main()
