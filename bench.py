"""Benchmark the training loop: `python bench.py [preset.py ...] [--key=value ...]` (see README)."""
from gpt_train.bench import main

if __name__ == "__main__":
    main()
