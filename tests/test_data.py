"""Text sources (txt, JSONL, Parquet, fsspec URLs, bundled) and the calibration/evaluation split."""
from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import make_windows, read_texts
from pipeline.errors import UserError


def test_windows_come_from_disjoint_halves():
    tokens = torch.arange(1000)
    w = make_windows(tokens, calib_samples=4, seq_len=50, eval_samples=0)
    assert w.calib.shape == (4, 50) and int(w.calib.max()) < 500
    assert w.eval.shape == (10, 50) and int(w.eval.min()) >= 500
    assert torch.equal(w.calib.flatten(), torch.arange(200))
    assert torch.equal(w.eval[0], torch.arange(500, 550))


def test_not_enough_tokens_is_a_user_error():
    with pytest.raises(UserError, match="calibration needs"):
        make_windows(torch.arange(100), 4, 50, 1)
    with pytest.raises(UserError, match="evaluation needs"):
        make_windows(torch.arange(100), 1, 10, 9)


def test_jsonl_parquet_and_memory_url(tmp_path):
    docs = ["first document", "second one", "third"]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": docs}), pqf)
    assert read_texts(str(jl)) == "\n\n".join(docs)
    assert read_texts(str(pqf), "body") == "\n\n".join(docs)
    with pytest.raises(UserError, match="no column 'text'"):
        read_texts(str(pqf))
    with fsspec.open("memory://corpus/a.txt", "w") as f:
        f.write("hello from memory")
    assert read_texts("memory://corpus/a.txt") == "hello from memory"


def test_bundled_wiki_has_no_doc_tags():
    text = read_texts("bundled:wiki")
    assert "<doc" not in text and "</doc>" not in text and len(text) > 1_000_000


def test_unsupported_source():
    with pytest.raises(UserError, match="unsupported data source"):
        read_texts("file.docx")
    with pytest.raises(UserError, match="unknown bundled text"):
        read_texts("bundled:nope")
