"""Run a training script whose checkpoint save of one iteration stops at a chosen moment, until killed.

    python tests/hang_in_save.py PHASE ITERATION train.py --key=value ...

PHASE 'staged': the save is written whole but not yet committed (the rename of the staging
folder); 'moving': committed, the previous training_state/ moved aside, the new one not yet in
place. The save is recognised by the iteration in the trainer_state.json it is renaming.
"""
import json
import os
import runpy
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_train.out_dir import COMMITTED_DIR, STATE_DIR, TRAINER_STATE  # noqa: E402

phase, iteration = sys.argv[1], int(sys.argv[2])
rename = os.rename


def saving_iteration(state_dir):
    try:
        with open(os.path.join(state_dir, TRAINER_STATE)) as f:
            return json.load(f)["iter_num"]
    except (OSError, ValueError, KeyError):
        return None


def hanging_rename(src, dst):
    src, dst = str(src), str(dst)
    if phase == "staged" and dst.endswith(COMMITTED_DIR):
        state_dir = os.path.join(src, STATE_DIR)
    elif phase == "moving" and src.endswith(os.path.join(COMMITTED_DIR, STATE_DIR)):
        state_dir = src
    else:
        state_dir = None
    if state_dir and saving_iteration(state_dir) == iteration:
        print(f"hanging in save: {phase}", flush=True)
        while True:
            time.sleep(1)
    rename(src, dst)


os.rename = hanging_rename
script, sys.argv = sys.argv[3], sys.argv[3:]
runpy.run_path(script, run_name="__main__")
