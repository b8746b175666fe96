"""Sample from a trained model: `python sample.py [preset.py ...] [--key=value ...]` (see README)."""
from gpt_train.sample import main

if __name__ == "__main__":
    main()
