"""Text sources and their cut into calibration and evaluation windows.

A source is `bundled:NAME`, or a plain text (.txt), JSON lines (.jsonl/.json) or Parquet
file, local or by fsspec URL. The whole text is tokenised once; the first half of the
tokens is calibration data, the second half held-out evaluation data, never mixed.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from cluster.storage import open_fs

from .errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".utf8")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _read_bytes(url: str) -> bytes:
    try:
        fs, path = open_fs(url)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"data source not found: {url}") from None


def column_texts(column, where: str) -> list[str]:
    """The values of a text column as str: UTF-8 strings, or bytes that decode as UTF-8;
    any other type (numbers, lists), or bytes that are not UTF-8, is refused in one line."""
    import pyarrow as pa
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise UserError(f"{where} holds {kind}, not text")
    try:
        values = column.to_pylist()
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values if v]
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (byte {e.start} of a value)") from None


def read_texts(source: str, text_field: str = "text") -> str:
    """All documents of a source joined by blank lines."""
    if source.startswith("bundled:"):
        from .bundled import bundled_text
        return bundled_text(source.split(":", 1)[1])
    lower = source.lower()
    if lower.endswith(TEXT_SUFFIXES):
        try:
            return _read_bytes(source).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data source {source} is not UTF-8 text (byte {e.start})") from None
    if lower.endswith(JSON_SUFFIXES) or lower.endswith(".parquet"):
        import pyarrow.json as pj
        import pyarrow.parquet as pq
        data = _read_bytes(source)
        if not lower.endswith(".parquet"):
            try:
                data.decode("utf-8")  # JSON is UTF-8; pyarrow would pass other bytes on as broken strings
            except UnicodeDecodeError as e:
                raise UserError(f"data source {source} is not UTF-8 text (byte {e.start})") from None
        try:
            table = pq.read_table(io.BytesIO(data)) if lower.endswith(".parquet") else pj.read_json(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - any parse failure is bad input
            raise UserError(f"cannot read {source}: {str(e).splitlines()[0]}") from None
        if text_field not in table.column_names:
            raise UserError(f"{source} has no column '{text_field}' (columns: {', '.join(table.column_names)}); "
                            "set data.text_field")
        return "\n\n".join(t for t in column_texts(table.column(text_field), f"{source} column '{text_field}'") if t)
    raise UserError(f"unsupported data source '{source}': use bundled:NAME or a .txt, .jsonl or .parquet file")


@dataclass
class Windows:
    """Token windows: calibration [N, L] from the first half, evaluation [M, L] from the second."""

    calib: torch.Tensor
    eval: torch.Tensor
    total_tokens: int


def make_windows(tokens: torch.Tensor, calib_samples: int, seq_len: int, eval_samples: int) -> Windows:
    """Cut non-overlapping windows: N from the start of the first half, M (0 = all) of the second."""
    half = tokens.numel() // 2
    first, second = tokens[:half], tokens[half:]
    need = calib_samples * seq_len
    if need > first.numel():
        raise UserError(f"calibration needs {calib_samples} x {seq_len} = {need} tokens but the first half "
                        f"of the data has {first.numel()}; lower data.calib_samples or data.seq_len")
    available = second.numel() // seq_len
    m = available if eval_samples == 0 else eval_samples
    if m < 1 or m > available:
        raise UserError(f"evaluation needs {m} windows of {seq_len} tokens but the held-out half has "
                        f"{available}; lower data.eval_samples")
    calib = first[:need].reshape(calib_samples, seq_len)
    ev = second[: m * seq_len].reshape(m, seq_len)
    return Windows(calib.clone(), ev.clone(), int(tokens.numel()))


def tokenize(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def load_windows(source: str, text_field: str, tokenizer, calib_samples: int, seq_len: int,
                 eval_samples: int) -> Windows:
    text = read_texts(source, text_field)
    if not text.strip():
        raise UserError(f"data source {source} holds no text")
    return make_windows(tokenize(text, tokenizer), calib_samples, seq_len, eval_samples)
