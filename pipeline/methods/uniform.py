"""The baselines: one factorisation per matrix at the uniform rank k = floor((1-r)mn/(m+n))."""
from __future__ import annotations

from .base import Method
from .registry import register


class Uniform(Method):
    """Factorisation `factorization` with uniform ranks from the matrix sizes."""

    def __init__(self, factorization: str) -> None:
        self.name = self.factorization = factorization

    def key_fields(self, stage: str) -> tuple[str, ...]:
        return ("compress.asvd_alpha",) if stage == "decompose" and self.factorization == "asvd" else ()


for _f in ("svd", "asvd", "svd-llm"):
    register(Uniform(_f))
