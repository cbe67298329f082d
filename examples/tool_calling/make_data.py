"""Write the tool-calling example data set: ShareGPT conversations with function calls (seeded).

    python examples/tool_calling/make_data.py [--rows 800] [--seed 0] [--out examples/tool_calling/tool_calls.jsonl]

(also writes ``tools.json`` beside it: all the function schemas, for ``ftpipe chat --tools``)

Every row has a ``tools`` column (a JSON string of 2 or 3 function schemas: the one the request needs
and distractors) and ``conversations`` in the public ShareGPT layout (``human``, ``gpt``,
``function_call``, ``observation``). Every conversation ends with a ``function_call`` turn, so every
held-out row tests a call: a single request (most rows), two functions called at once, or a first
round (request, call, result, answer) followed by a second request. The requests, values and
results are drawn from the small tables below; nothing is downloaded. The same seed writes the same
file byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _schema(name: str, description: str, params: dict[str, dict[str, Any]], required: list[str]) -> dict:
    return {
        "name": name,
        "description": description,
        "parameters": {"type": "object", "properties": params, "required": required},
    }


S, N, I = {"type": "string"}, {"type": "number"}, {"type": "integer"}  # noqa: E741
FUNCTIONS = {
    "get_weather": _schema(
        "get_weather",
        "Current weather in a city",
        {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    "convert_currency": _schema(
        "convert_currency",
        "Convert an amount of money",
        {"amount": N, "from_currency": S, "to_currency": S},
        ["amount", "from_currency", "to_currency"],
    ),
    "set_timer": _schema("set_timer", "Start a timer", {"minutes": I, "label": S}, ["minutes"]),
    "search_flights": _schema(
        "search_flights",
        "Find flights",
        {"origin": S, "destination": S, "date": S},
        ["origin", "destination", "date"],
    ),
    "send_email": _schema("send_email", "Send an email", {"to": S, "subject": S}, ["to", "subject"]),
    "get_stock_price": _schema("get_stock_price", "Latest price of a stock", {"symbol": S}, ["symbol"]),
    "translate_text": _schema(
        "translate_text", "Translate text", {"text": S, "target_language": S}, ["text", "target_language"]
    ),
    "calculate_tip": _schema(
        "calculate_tip", "Tip for a bill", {"bill": N, "percent": I}, ["bill", "percent"]
    ),
}

CITIES = [
    "Paris",
    "Tokyo",
    "Lima",
    "Oslo",
    "Cairo",
    "Denver",
    "Madrid",
    "Seoul",
    "Nairobi",
    "Dublin",
    "Lisbon",
    "Toronto",
    "Mumbai",
    "Sydney",
    "Berlin",
    "Quito",
    "Hanoi",
    "Vienna",
    "Boston",
    "Accra",
    "Prague",
    "Santiago",
    "Helsinki",
    "Istanbul",
    "Manila",
    "Zurich",
    "Austin",
    "Bogota",
    "Warsaw",
    "Osaka",
]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR", "BRL", "SEK"]
LABELS = ["tea", "pasta", "laundry", "eggs", "bread", "workout", "meeting", "nap", "rice", "pizza"]
PEOPLE = ["anna", "bo", "chen", "dara", "eli", "femi", "gus", "hana", "ivan", "jo", "kai", "lena"]
SUBJECTS = ["Lunch on Friday", "Project update", "Invoice", "Trip plans", "Welcome", "Quick question"]
SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "TSLA", "GOOG", "META", "IBM", "ORCL", "SAP"]
PHRASES = [
    "good morning",
    "thank you very much",
    "where is the station",
    "see you tomorrow",
    "happy birthday",
]
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Italian", "Korean", "Portuguese", "Dutch"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy"]

Request = tuple[str, dict[str, Any]]


def weather(r: random.Random) -> Request:
    city = r.choice(CITIES)
    if r.random() < 0.4:
        unit = r.choice(["celsius", "fahrenheit"])
        text = r.choice(
            [
                "What's the weather in {c} in {u}?",
                "Weather for {c}, in {u} please.",
                "How warm is {c} right now, in {u}?",
            ]
        )
        return text.format(c=city, u=unit), {"city": city, "unit": unit}
    text = r.choice(
        [
            "What's the weather in {c}?",
            "Is it raining in {c}?",
            "How is the weather in {c} today?",
            "Weather in {c}?",
        ]
    )
    return text.format(c=city), {"city": city}


def currency(r: random.Random) -> Request:
    amount = r.choice([r.randint(5, 2000), round(r.uniform(5, 500), 2)])
    a, b = r.sample(CURRENCIES, 2)
    text = r.choice(
        ["Convert {x} {a} to {b}.", "How much is {x} {a} in {b}?", "What are {x} {a} worth in {b}?"]
    )
    return text.format(x=amount, a=a, b=b), {"amount": amount, "from_currency": a, "to_currency": b}


def timer(r: random.Random) -> Request:
    minutes = r.randint(1, 90)
    if r.random() < 0.5:
        label = r.choice(LABELS)
        text = r.choice(
            [
                "Set a {m} minute timer for {l}.",
                "Timer: {m} minutes, label it {l}.",
                "Remind me in {m} minutes about the {l}.",
            ]
        )
        return text.format(m=minutes, l=label), {"minutes": minutes, "label": label}
    text = r.choice(
        ["Set a timer for {m} minutes.", "Start a {m}-minute timer.", "Count down {m} minutes for me."]
    )
    return text.format(m=minutes), {"minutes": minutes}


def flights(r: random.Random) -> Request:
    origin, destination = r.sample(CITIES, 2)
    date = f"2027-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    text = r.choice(
        [
            "Find flights from {o} to {d} on {t}.",
            "Any flights {o} to {d} on {t}?",
            "I need to fly from {o} to {d} on {t}.",
        ]
    )
    return text.format(o=origin, d=destination, t=date), {
        "origin": origin,
        "destination": destination,
        "date": date,
    }


def email(r: random.Random) -> Request:
    to, subject = f"{r.choice(PEOPLE)}@example.com", r.choice(SUBJECTS)
    text = r.choice(
        [
            'Email {t} with the subject "{s}".',
            "Send an email to {t}, subject: {s}.",
            'Write to {t} about "{s}".',
        ]
    )
    return text.format(t=to, s=subject), {"to": to, "subject": subject}


def stock(r: random.Random) -> Request:
    symbol = r.choice(SYMBOLS)
    text = r.choice(["What is {s} trading at?", "Price of {s} stock?", "How much is one {s} share now?"])
    return text.format(s=symbol), {"symbol": symbol}


def translate(r: random.Random) -> Request:
    phrase, language = r.choice(PHRASES), r.choice(LANGUAGES)
    text = r.choice(
        ['Translate "{p}" into {l}.', 'How do you say "{p}" in {l}?', 'Say "{p}" in {l}, please.']
    )
    return text.format(p=phrase, l=language), {"text": phrase, "target_language": language}


def tip(r: random.Random) -> Request:
    bill, percent = round(r.uniform(10, 300), 2), r.choice([10, 12, 15, 18, 20, 25])
    text = r.choice(
        [
            "What is a {p}% tip on {b}?",
            "Tip {p} percent on a bill of {b}.",
            "My bill is {b}; how much is a {p}% tip?",
        ]
    )
    return text.format(p=percent, b=bill), {"bill": bill, "percent": percent}


REQUESTS: dict[str, Callable[[random.Random], Request]] = {
    "get_weather": weather,
    "convert_currency": currency,
    "set_timer": timer,
    "search_flights": flights,
    "send_email": email,
    "get_stock_price": stock,
    "translate_text": translate,
    "calculate_tip": tip,
}


def result_and_answer(r: random.Random, name: str, args: dict[str, Any]) -> tuple[dict, str]:
    """A tool result for a call and the assistant's answer that uses it."""
    if name == "get_weather":
        t, cond = r.randint(-5, 35), r.choice(CONDITIONS)
        return {"temperature": t, "condition": cond}, f"It is {t} degrees and {cond} in {args['city']}."
    if name == "convert_currency":
        value = round(args["amount"] * r.uniform(0.5, 1.5), 2)
        return {
            "result": value
        }, f"{args['amount']} {args['from_currency']} is about {value} {args['to_currency']}."
    if name == "set_timer":
        return {"status": "started"}, f"Your {args['minutes']}-minute timer is running."
    if name == "search_flights":
        n = r.randint(0, 6)
        return {"flights": n}, f"I found {n} flights from {args['origin']} to {args['destination']}."
    if name == "send_email":
        return {"status": "sent"}, f"The email to {args['to']} has been sent."
    if name == "get_stock_price":
        price = round(r.uniform(20, 900), 2)
        return {"price": price}, f"{args['symbol']} trades at {price}."
    if name == "translate_text":
        return {"translation": "..."}, f"Here is the {args['target_language']} translation."
    value = round(args["bill"] * args["percent"] / 100, 2)
    return {"tip": value}, f"A {args['percent']}% tip is {value}."


def _call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "arguments": args}


def make_row(r: random.Random) -> dict[str, Any]:
    kind = r.choices(["single", "parallel", "two_rounds"], weights=[65, 10, 25])[0]
    names = r.sample(sorted(FUNCTIONS), 2 if kind == "two_rounds" else 1)
    distractors = [n for n in sorted(FUNCTIONS) if n not in names]
    offered = names + r.sample(distractors, r.choice([1, 2]) if kind != "two_rounds" else 1)
    r.shuffle(offered)
    conversations: list[dict[str, str]] = []
    if kind == "two_rounds":
        text, args = REQUESTS[names[0]](r)
        result, answer = result_and_answer(r, names[0], args)
        conversations += [
            {"from": "human", "value": text},
            {"from": "function_call", "value": json.dumps(_call(names[0], args))},
            {"from": "observation", "value": json.dumps(result)},
            {"from": "gpt", "value": answer},
        ]
        names = names[1:]
    if kind == "parallel":
        (text_a, args_a), (text_b, args_b) = REQUESTS[names[0]](r), REQUESTS[names[0]](r)
        text = f"{text_a} Also: {text_b[0].lower()}{text_b[1:]}"
        calls = [_call(names[0], args_a), _call(names[0], args_b)]
        conversations += [
            {"from": "human", "value": text},
            {"from": "function_call", "value": json.dumps(calls)},
        ]
    else:
        text, args = REQUESTS[names[-1]](r)
        conversations += [
            {"from": "human", "value": text},
            {"from": "function_call", "value": json.dumps(_call(names[-1], args))},
        ]
    return {"conversations": conversations, "tools": json.dumps([FUNCTIONS[n] for n in offered])}


def write(path: Path, rows: int, seed: int) -> Path:
    r = random.Random(seed)
    lines = [json.dumps(make_row(r), ensure_ascii=False) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tools(path: Path) -> Path:
    """Every function schema as one JSON list (``ftpipe chat --tools``)."""
    path.write_text(json.dumps(list(FUNCTIONS.values()), indent=2) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "tool_calls.jsonl")
    args = parser.parse_args()
    print(write(args.out, args.rows, args.seed))
    print(write_tools(args.out.with_name("tools.json")))


if __name__ == "__main__":
    main()
