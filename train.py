"""Train a GPT-2: `python train.py [preset.py ...] [--key=value ...]` (see README)."""
from gpt_train.commands import train

if __name__ == "__main__":
    train()
