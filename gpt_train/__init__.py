"""gpt-train: nanoGPT's GPT-2 trainer rebuilt on transformers and Accelerate."""
import logging

# bitsandbytes (for optimizer='adamw_8bit'; peft imports it too where it is installed) warns at its
# import that an optional 4-bit CPU kernel is missing: nothing here quantises weights.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
