#!/usr/bin/env bash
# Fetch the wheels of the checkpoint-export extras (safetensors, transformers, accelerate and the dependencies a bare
# torch install lacks) on a machine WITH network access, into the git-ignored folder .whl/, which then travels to
# the GPU machine (no network there) as a `carry` path. The GPU tests install from it with
#   python -m pip install --no-index --find-links .whl "transformers==$TRANSFORMERS_VERSION" accelerate safetensors
# (tests/test_export.py does that itself when transformers is missing and .whl/ is there).
#
#   bash tools/fetch_wheels.sh            # -> .whl/*.whl, ~25 MB
#
# transformers is pinned to the 4.57 line on purpose: its FP8 linear runs an in-tree Triton kernel. transformers 5.x
# fetches its FP8 matmul kernel from the Hugging Face hub at the first forward (`kernels-community/finegrained-fp8`
# through the `kernels` package) or needs DeepGEMM, neither of which a machine without network has. The checkpoint
# format is the same for both lines (5.x maps per-expert names onto its fused experts when it loads).
#
# Only pure-python or abi3 wheels, except regex, PyYAML and charset-normalizer, which have neither: those are fetched for every CPython
# from 3.10 to 3.13 (the GPU machine's version is not known here). Torch, numpy and triton are not fetched: the
# GPU machine has its own.
set -euo pipefail

TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-4.57.6}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
mkdir -p "$DEST"

# name==version pins where the 4.57 line needs them (huggingface-hub 1.x is for transformers 5)
PURE=(
    "transformers==$TRANSFORMERS_VERSION" accelerate "huggingface-hub>=0.34,<1.0" safetensors "tokenizers>=0.22,<=0.23.0"
    hf-xet requests urllib3 idna certifi tqdm filelock packaging psutil fsspec typing-extensions
)
PER_PYTHON=(regex pyyaml charset-normalizer)

dl() {  # pip download one package, binary wheels for linux x86_64 only, no dependency resolution
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        --implementation cp -d "$DEST" "$@"
}

for pkg in "${PURE[@]}"; do
    dl --python-version 3.12 "$pkg"
done
for py in 3.10 3.11 3.12 3.13; do
    for pkg in "${PER_PYTHON[@]}"; do
        dl --python-version "$py" "$pkg"
    done
done

total=$(du -sm "$DEST" | cut -f1)
echo "[fetch_wheels] $(ls "$DEST"/*.whl | wc -l) wheels, ${total} MB in $DEST"
if (( total > 40 )); then
    echo "[fetch_wheels] ERROR: ${total} MB is over the 40 MB carry budget" >&2
    exit 1
fi
