"""Every per-architecture detail of the pipeline, in one place.

The layer-by-layer runner (pipeline/layerwise.py) needs no per-model code: it records the
arguments the model's own forward gives each decoder layer and reuses them. What remains
is listed here: which `model_type`s are supported (each was checked by
tests/test_architectures.py: layer-by-layer logits equal the model's own forward, and it
compresses end to end), the attention implementation to build with, and what the model's
CausalLM head applies after the lm_head. Everything is read from config attributes where
possible, not branched on model_type.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import UserError

SUPPORTED: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM, TinyLlama, ...: pre-norm, RoPE, GQA, SwiGLU",
    "mistral": "Mistral: Llama layout, sliding-window mask when config.sliding_window is set",
    "ministral": "Ministral: Mistral layout with per-layer sliding/full attention (config.layer_types)",
    "qwen2": "Qwen2/2.5: Llama layout with q/k/v biases; per-layer sliding/full masks (config.layer_types)",
    "qwen3": "Qwen3 (dense): Llama layout with q/k RMSNorm; per-layer sliding/full masks",
    "gemma": "Gemma: scaled embeddings, (1 + w) RMSNorm, GeGLU",
    "gemma2": "Gemma 2: sliding/global layers, four norms per layer, attention and final logit "
              "soft-capping (built with eager attention: sdpa has no soft-capping)",
    "gemma3_text": "Gemma 3 text-only (Gemma3ForCausalLM): sliding/global layers with their own masks and "
                   "rotary embeddings, q/k norms, optional final logit soft-capping",
    "phi3": "Phi-3/3.5/4-mini: fused qkv_proj and gate_up_proj",
    "olmo": "OLMo: non-parametric LayerNorm",
    "olmo2": "OLMo 2: post-norms (norm after attention and MLP), q/k RMSNorm",
    "cohere": "Command-R: parallel attention and MLP, LayerNorm, logit_scale on the logits",
    "cohere2": "Command R7B: sliding/global layers (global without RoPE), logit_scale on the logits",
    "granite": "Granite 3: embedding/residual/attention multipliers, logits divided by logits_scaling",
    "starcoder2": "StarCoder2: LayerNorm with bias, c_fc/c_proj MLP, sliding-window mask",
}
"""model_type -> the family and what distinguishes it. Not here: mixture-of-experts families
(their experts are not nn.Linear modules the pipeline could factor), multimodal wrappers
(model_type "gemma3" is Gemma3ForConditionalGeneration), and families whose checkpoint keys
transformers renames on load (gpt_neox: `embed_out` -> `lm_head`, see its
conversion_mapping.py), since the pipeline reads the shards by module name."""


def check_supported(config) -> None:
    """Raise UserError (one line) unless config's model_type is a supported causal LM."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UserError(f"model_type '{model_type}' is not supported (supported: {', '.join(sorted(SUPPORTED))})")


def attn_implementation(config) -> str:
    """The attention implementation to build with: "sdpa" (fast, exact) unless the model needs
    what sdpa lacks. Attention-logit soft-capping (Gemma 2) makes transformers' sdpa path
    raise, and a model class may declare it has no sdpa path at all (Gemma2 does): "eager"
    then, which is what transformers itself falls back to."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return "sdpa"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def head_postprocess(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the CausalLM forward applies to `lm_head(final_norm(h))`, read from the config:
    `logit_scale` (Cohere: multiply), `logits_scaling` (Granite: divide) and
    `final_logit_softcapping` (Gemma 2/3: tanh(x / cap) * cap). None when nothing is."""
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale is None and divide is None and cap is None:
        return None

    def post(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post
