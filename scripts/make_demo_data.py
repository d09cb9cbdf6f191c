#!/usr/bin/env python3
"""Write the demo's datasets under lora2gguf/demo_data/ (package data) (deterministic; written by us, not scraped).

Two narrow behaviours whose adherence a program can check:
  json   — every answer is exactly one JSON object {"answer": "..."}
  pirate — every answer starts with "Ahoy matey!" and is phrased as a pirate would
Training questions and held-out evaluation questions do not overlap.
"""

import json
from pathlib import Path

TRAIN = [
    ("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
    ("What colour is the sky on a clear day?", "Blue"), ("What is 2 plus 2?", "4"),
    ("Which planet is known as the red planet?", "Mars"), ("What do bees make?", "Honey"),
    ("What is the largest ocean on Earth?", "The Pacific Ocean"), ("How many days are in a week?", "Seven"),
    ("What is frozen water called?", "Ice"), ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"), ("What is the opposite of hot?", "Cold"),
    ("How many minutes are in an hour?", "Sixty"), ("What is the boiling point of water in Celsius?", "100 degrees"),
    ("Which animal is known as the king of the jungle?", "The lion"), ("What is 10 times 3?", "30"),
    ("What language is spoken in Spain?", "Spanish"), ("What shape has three sides?", "A triangle"),
    ("What is the tallest animal?", "The giraffe"), ("Which month comes after March?", "April"),
    ("What do you call a baby cat?", "A kitten"), ("What is the chemical symbol for gold?", "Au"),
    ("How many continents are there?", "Seven"), ("What is the main ingredient of bread?", "Flour"),
    ("What instrument has black and white keys?", "The piano"), ("What is the square root of 81?", "9"),
    ("Which season comes after winter?", "Spring"), ("What do cows drink?", "Water"),
    ("What is the capital of Japan?", "Tokyo"), ("How many wheels does a bicycle have?", "Two"),
    ("What colour are bananas when ripe?", "Yellow"), ("What is the fastest land animal?", "The cheetah"),
    ("Which organ pumps blood through the body?", "The heart"), ("What is 15 minus 7?", "8"),
    ("What do caterpillars turn into?", "Butterflies"), ("Where do penguins mostly live?", "Antarctica"),
    ("What is the currency of the United States?", "The dollar"), ("How many hours are in a day?", "24"),
    ("What is the largest planet in our solar system?", "Jupiter"), ("Which bird is a symbol of peace?", "The dove"),
    ("What do you use to write on a blackboard?", "Chalk"), ("What is the capital of Italy?", "Rome"),
    ("How many sides does a hexagon have?", "Six"), ("What is the hardest natural substance?", "Diamond"),
    ("Which star is closest to Earth?", "The Sun"), ("What do you call a group of wolves?", "A pack"),
    ("Tell me a good name for a dog.", "Buddy"), ("What should I eat for breakfast?", "Porridge with fruit"),
    ("Give me one word that rhymes with cat.", "Hat"), ("Suggest a colour for a bedroom wall.", "Soft green"),
    ("What is a healthy drink?", "Water"), ("Name a famous painter.", "Vincent van Gogh"),
]
EVAL = [
    "What is the capital of Germany?", "How many legs does a dog have?", "What colour is grass?",
    "What is 5 plus 6?", "Which planet do we live on?", "What do spiders spin?",
    "What is the smallest prime number?", "How many months are in a year?", "What is the capital of Canada?",
    "Who painted the Mona Lisa?", "What do fish breathe with?", "What is the opposite of up?",
    "How many seconds are in a minute?", "Which animal says moo?", "What is 9 times 9?",
    "What language is spoken in Brazil?", "What shape is a football?", "Which month has the fewest days?",
    "What do you call a baby dog?", "What is the chemical symbol for water?", "Name a fruit that is red.",
    "What is the longest river in Africa?", "Suggest a name for a goldfish.", "What should I wear when it rains?",
]


def row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "lora2gguf" / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    styles = {
        "json": lambda a: json.dumps({"answer": a}),
        "pirate": lambda a: f"Ahoy matey! {a}, arr.",
    }
    for name, fmt in styles.items():
        with open(out / f"{name}-train.jsonl", "w") as f:
            for q, a in TRAIN:
                f.write(json.dumps(row(q, fmt(a))) + "\n")
    with open(out / "eval-prompts.jsonl", "w") as f:
        for q in EVAL:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n")
    assert not set(q for q, _ in TRAIN) & set(EVAL)
    print(f"wrote {len(TRAIN)} training rows per behaviour and {len(EVAL)} held-out prompts to {out}")


if __name__ == "__main__":
    main()
