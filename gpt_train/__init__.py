"""gpt-train: nanoGPT's GPT-2 trainer rebuilt on transformers and Accelerate."""
