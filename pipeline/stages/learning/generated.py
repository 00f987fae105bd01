"""Windows the dense model writes itself, with its targets on them: distillation input beyond
the calibration text (soco.generated_windows; 0, the default, leaves this out).

Why: the learn stage fits its few training windows far better than held-out text (training KL
0.1-0.2 against 0.4-1.1 held out, README "Issue 14"), and more real text lowers the damage on
every held-out text (the 256-window column), but the protocol fixes the calibration text.
Text sampled from the dense model needs none: each generated window continues the first
soco.generate_prompt tokens of a training window (the windows taken in turn) at
soco.generate_temperature, as data-free distillation does (LLM-QAT, Liu et al. 2023), and the
student learns to match the dense model on text the dense model finds likely.

Output contract, teacher/generated.safetensors:
  `windows`  int64 [G, L], the generated windows (L = data.seq_len)
  `logp`, `idx`  float32 / int32 [G, L, k]: the dense top-k log-probabilities and their token
             ids, as teacher/topk.safetensors holds them for the calibration windows
  `hidden`   with soco.hidden_layers: bfloat16 [G, distilled layers, L, d], as
             teacher/hidden.safetensors; metadata `layers` (JSON) names the layers, and
             `inputs` digests what the file was computed from (teacher_reuse.py)
Training draws its batches from the real training windows and these together (from the stage
soco.generated_from names on; real ones only before it); the held-out windows, which stop the
stages, stay real text.

The whole dense model is held in this process while it samples and scores (transformers'
generate, token by token with a KV cache, which the layer-by-layer path cannot do), as zero-shot
evaluation holds the assembled model: the option is for models that fit one process's memory.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from cluster.storage import Storage
from soco.objective import teacher_topk

from ...checkpoint import load_dense
from ...layerwise import layer_output
from ...model_io import ModelSource, find_layers
from ..calibrate import WINDOWS_FILE
from .teacher import HIDDEN_DTYPE, INPUTS_KEY

if TYPE_CHECKING:
    from .config import SocoConfig

GENERATED_FILE = "teacher/generated.safetensors"


def prompts_for(windows: torch.Tensor, n_train: int, count: int, length: int) -> torch.Tensor:
    """`count` prompts: the first `length` tokens of the training windows (the first `n_train`
    rows of `windows`), taken in turn."""
    return windows[torch.arange(count) % n_train, :length].clone()


@torch.no_grad()
def sample_windows(model: nn.Module, prompts: torch.Tensor, seq_len: int, temperature: float, seed: int,
                   batch_size: int, progress: bool = True) -> torch.Tensor:
    """Every prompt continued to `seq_len` tokens by sampling the model's whole distribution at
    `temperature`: no top-k or top-p cut, and no end-of-text token (it is suppressed, so every
    window has the same length, as the calibration windows do). The same arguments give the
    same windows; the caller's random state is left as it was."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    new = seq_len - prompts.shape[1]

    class Counted(LogitsProcessor):
        """Advances the progress bar by one token per sequence at every sampling step."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            bar.update(input_ids.shape[0])
            return scores

    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new,
                              min_new_tokens=new, eos_token_id=model.config.eos_token_id, pad_token_id=0)
    out = []
    with torch.random.fork_rng(devices=[]), tqdm(total=prompts.shape[0] * new, desc="learn: generating windows",
                                                unit="tok", disable=not progress) as bar:
        torch.manual_seed(seed)
        for b in range(0, prompts.shape[0], batch_size):
            p = prompts[b:b + batch_size]
            out.append(model.generate(p, attention_mask=torch.ones_like(p), generation_config=config,
                                      logits_processor=LogitsProcessorList([Counted()])))
    windows = torch.cat(out)
    if windows.shape[1] != seq_len:  # generate stopped early: no window may be shorter than the rest
        raise RuntimeError(f"generation returned windows of {windows.shape[1]} tokens, not {seq_len}")
    return windows


@torch.no_grad()
def dense_targets(model: nn.Module, windows: torch.Tensor, k: int, layers: list[int],
                  batch_size: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """The dense model's top-k log-probabilities on `windows` and its outputs of decoder
    `layers` (none: no `hidden`), what teacher/topk and teacher/hidden hold for the calibration
    windows, here from the model's own forward since the whole model is in memory."""
    decoder = find_layers(model)[1]
    kept: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(_mod: nn.Module, _args: tuple, out: object) -> None:
            kept[i] = layer_output(out)
        return hook

    hooks = [decoder[i].register_forward_hook(keep(i)) for i in layers]
    logp, idx, hidden = [], [], []
    try:
        for b in tqdm(range(0, windows.shape[0], batch_size), desc="learn: dense targets of the generated windows",
                      unit="batch", disable=not progress):
            lp, ix = teacher_topk(model(windows[b:b + batch_size], use_cache=False).logits, k)
            logp.append(lp)
            idx.append(ix)
            if layers:
                hidden.append(torch.stack([kept[i] for i in layers], dim=1).to(HIDDEN_DTYPE))
    finally:
        for h in hooks:
            h.remove()
    out = {"logp": torch.cat(logp), "idx": torch.cat(idx)}
    if layers:
        out["hidden"] = torch.cat(hidden)
    return out


def cache_generated(source: ModelSource, store: Storage, s: SocoConfig, layers: list[int], dtype: torch.dtype,
                    batch_size: int, inputs: str, progress: bool = True) -> None:
    """Sample soco.generated_windows windows from the dense model and commit them with its
    targets on them (the contract above); `layers` are the distilled decoder layers, `inputs`
    the digest of what the file depends on (teacher_reuse.teacher_inputs)."""
    windows = store.load_tensors(WINDOWS_FILE)["windows"]
    n_train = windows.shape[0] - s.holdout_samples
    model = load_dense(source, dtype).eval()
    prompts = prompts_for(windows, n_train, s.generated_windows, s.generate_prompt)
    generated = sample_windows(model, prompts, windows.shape[1], s.generate_temperature, s.seed, batch_size,
                               progress)
    targets = dense_targets(model, generated, s.topk, layers, batch_size, progress)
    store.save_tensors(GENERATED_FILE, {"windows": generated, **targets},
                       {"layers": json.dumps(layers), INPUTS_KEY: inputs})


def load_generated(store: Storage) -> dict[str, torch.Tensor]:
    """What `cache_generated` committed (the contract above)."""
    return store.load_tensors(GENERATED_FILE)
