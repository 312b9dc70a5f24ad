"""Writes qlora_kernels/data/instructions.jsonl: the built-in instruction data of
``python -m qlora_kernels`` (Alpaca records: instruction, input, output).

Small, regular tasks that a tiny byte-level model picks up within minutes on a CPU:
capitals, uppercase, string reversal, two-number sums, counting letters, list sorting.
Deterministic (fixed seed): rerunning the script reproduces the committed file.

    python tools/make_builtin_data.py
"""

from __future__ import annotations

import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Brazil": "Brasilia",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Austria": "Vienna", "Ireland": "Dublin", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "Mexico": "Mexico City", "Australia": "Canberra", "Argentina": "Buenos Aires",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Hungary": "Budapest", "Czechia": "Prague", "Switzerland": "Bern", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ghana": "Accra", "Colombia": "Bogota",
}
WORDS = ("apple river stone cloud green light music paper table water quick happy silver garden "
         "yellow window planet orange summer winter bridge candle forest market pencil rocket").split()


def records(rng: random.Random):
    for country, capital in CAPITALS.items():
        for question in ("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"):
            yield {"instruction": question.format(country), "input": "", "output": f"The capital of {country} is {capital}."}
    for _ in range(90):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    for _ in range(90):
        text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        yield {"instruction": "Convert the text to uppercase.", "input": text, "output": text.upper()}
    for _ in range(90):
        word = rng.choice(WORDS)
        yield {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    for _ in range(60):
        word = rng.choice(WORDS)
        letter = rng.choice(word)
        yield {"instruction": f"How many times does the letter '{letter}' appear in the word?", "input": word,
               "output": str(word.count(letter))}
    for _ in range(60):
        nums = [rng.randint(0, 50) for _ in range(rng.randint(3, 5))]
        yield {"instruction": "Sort the numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
               "output": ", ".join(map(str, sorted(nums)))}


def main() -> None:
    rng = random.Random(1234)
    data = list(records(rng))
    rng.shuffle(data)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qlora_kernels", "data",
                        "instructions.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in data:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(data)} records to {path}")


if __name__ == "__main__":
    main()
