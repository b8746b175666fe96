"""Writes tiny_chats.jsonl beside this file: 400 short conversations in the `messages` format
(arithmetic, greetings, echoing a word, multi-turn), small enough to fine-tune on a CPU and
regular enough that a small model visibly learns to answer. Deterministic: seeded.

    python data_prep/chat/make_tiny_chats.py
"""
import json
import os
import random

WORDS = ["apple", "river", "stone", "candle", "garden", "window", "silver", "thunder", "meadow", "lantern",
         "harbor", "feather", "mirror", "orchard", "compass", "velvet", "castle", "forest", "button", "pepper"]
GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What would you like to know?"),
             ("Good morning.", "Good morning! How can I help?"), ("Thank you!", "You are welcome.")]
SYSTEM = "You are a helpful assistant. Answer briefly."


def arithmetic(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def echo(rng):
    word = rng.choice(WORDS)
    return f"Repeat the word {word}.", f"{word.capitalize()}."


def conversation(rng):
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    if rng.random() < 0.3:
        question, answer = rng.choice(GREETINGS)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for _ in range(rng.randint(1, 3)):
        question, answer = (arithmetic if rng.random() < 0.7 else echo)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main():
    rng = random.Random(2357)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_chats.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(400):
            f.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
