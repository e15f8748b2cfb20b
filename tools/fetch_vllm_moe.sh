#!/usr/bin/env bash
# Fetch vLLM's block-FP8 fused-MoE Triton kernel source (and its tuned tile configs) on a machine WITH network
# access, into the git-ignored folder .vllm/, which then travels to the GPU machine (no network, no vllm installed)
# as a `carry` path. bench/peer_vllm.py (the peer harness of issue 24) reads it there; nothing of vLLM is committed.
#
#   bash tools/fetch_vllm_moe.sh                 # -> .vllm/fused_moe.py, .vllm/configs/*.json, .vllm/VERSION (~0.3 MB)
#   VLLM_VERSION=0.26.0 bash tools/fetch_vllm_moe.sh
#
# What is kept from the wheel (a zip; ~240 MB, deleted afterwards):
#   vllm/model_executor/layers/fused_moe/fused_moe.py        -> .vllm/fused_moe.py (the harness extracts the
#       @triton.jit kernel from it with `ast`; the file itself imports vLLM internals and is never imported)
#   vllm/model_executor/layers/fused_moe/configs/E=*,N=*,device_name=*,dtype=fp8_w8a8,block_shape=[128,128]*.json
#       -> .vllm/configs/ (the per-card tuned tiles vLLM picks for block-FP8; `*_down.json` are the GEMM2 tiles of
#       its sorted-A TMA path). No other JSON is needed: without a tuned file vLLM computes its default tiles in
#       get_default_config (code, in fused_moe.py).
#   .vllm/VERSION: the version, the wheel's name and sha256, and the extracted files.
#
# Pinned: 0.34.0, the newest release PyPI gives here (it pins torch 2.14; the newest pinning torch 2.11, the GPU
# machine's, is 0.26.0, whose kernel has no TMA path: the harness detects that from the kernel's parameters).
# Idempotent: nothing is downloaded when .vllm/VERSION already names the requested version and the files are there.
set -euo pipefail

VERSION="${VLLM_VERSION:-0.34.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.vllm"

if [[ -s "$DEST/VERSION" && -s "$DEST/fused_moe.py" && -d "$DEST/configs" ]] \
        && [[ "$(sed -n 's/^version=//p' "$DEST/VERSION")" == "$VERSION" ]]; then
    echo "[fetch_vllm_moe] vLLM $VERSION already in $DEST"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "vllm==$VERSION"
    whl="$(ls "$tmp"/vllm-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
    if [[ -z "$whl" ]]; then
        echo "[fetch_vllm_moe] ERROR: pip did not download a wheel of vllm==$VERSION (no index access?)" >&2
        exit 1
    fi
    rm -rf "$DEST.part"
    mkdir -p "$DEST.part/configs"
    python3 - "$whl" "$DEST.part" "$VERSION" <<'PY'
import hashlib
import os
import sys
import zipfile

whl, dest, version = sys.argv[1:4]
pkg = "vllm/model_executor/layers/fused_moe/"
sha = hashlib.sha256()
with open(whl, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha.update(chunk)
kept = []
with zipfile.ZipFile(whl) as z:
    names = set(z.namelist())
    if pkg + "fused_moe.py" not in names:
        sys.exit(f"[fetch_vllm_moe] ERROR: {pkg}fused_moe.py is not in {os.path.basename(whl)}")
    with open(os.path.join(dest, "fused_moe.py"), "wb") as f:
        f.write(z.read(pkg + "fused_moe.py"))
    kept.append("fused_moe.py")
    for n in sorted(names):
        base = n[len(pkg + "configs/"):] if n.startswith(pkg + "configs/") else ""
        if base and "/" not in base and base.endswith(".json") and "dtype=fp8_w8a8" in base \
                and "block_shape=[128,128]" in base:
            with open(os.path.join(dest, "configs", base), "wb") as f:
                f.write(z.read(n))
            kept.append("configs/" + base)
if len(kept) < 2:
    sys.exit("[fetch_vllm_moe] ERROR: no dtype=fp8_w8a8,block_shape=[128,128] config in the wheel")
with open(os.path.join(dest, "VERSION"), "w") as f:
    f.write(f"version={version}\nwheel={os.path.basename(whl)}\nsha256={sha.hexdigest()}\n")
    f.write(f"source={pkg}\nfiles={len(kept)}\n")
    f.write("".join(k + "\n" for k in kept))
print(f"[fetch_vllm_moe] extracted {len(kept)} files of {os.path.basename(whl)}")
PY
    rm -rf "$DEST"
    mv "$DEST.part" "$DEST"
    rm -f "$whl"
fi

echo "[fetch_vllm_moe] $(head -1 "$DEST/VERSION"): $(ls "$DEST/configs" | wc -l) configs," \
     "total $(du -sh "$DEST" | cut -f1) (the device tool carries at most 64 MiB with the working tree)"
