#!/usr/bin/env bash
# What a GPU session carries to a device that reaches no network (its image has torch, accelerate,
# tokenizers, peft... but not this repo's pins of the rest): nanoGPT's code, for the side-by-side
# runs, and the wheels of the pinned packages the image lacks or holds at another version. Run here
# once, from the repository root; .carry/ is git-ignored, and the device call names it in `carry`:
#   bash benchmarks/gpu_carry.sh && git -C .carry/nanoGPT log -1 --format=%h
# gpu_checks.sh installs the wheels into /tmp/site at its start. 64 MiB travel in all, so
# bitsandbytes (43 MB) is left out unless GPU_CARRY_BNB=1: the 8-bit AdamW cases then say skipped.
set -euo pipefail
mkdir -p .carry/wheels
if [ ! -d .carry/nanoGPT ]; then
    src=${NANOGPT:-}
    [ -n "$src" ] || { echo "set NANOGPT to a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT)"; exit 2; }
    git clone -q "$src" .carry/nanoGPT
    rm -rf .carry/nanoGPT/.git .carry/nanoGPT/assets  # the code alone
fi
pins() { grep -E "^($1)==" requirements.txt | cut -d' ' -f1; }
packages="$(pins 'transformers|huggingface_hub|datasets|peft') dill==0.4.1 multiprocess==0.70.19"
[ "${GPU_CARRY_BNB:-0}" = 1 ] && packages="$packages $(pins bitsandbytes)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .carry/wheels $packages
du -sh .carry
