"""A soco-compressed causal LM for plain transformers (this project need not be installed).

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

The class is the checkpoint's base architecture (the transformers class for its
`model_type`) with every compressed linear replaced, at the shapes `config.json["soco"]`
records, before any weight is loaded: `ranks` {module: k} become low-rank linears
(`down`: k x n, then `up`: m x k, + the bias), `shapes` {module: [out, in]} become narrower
dense linears (structurally pruned MLP channels). transformers builds the model on the meta
device when loading, so the dense weights are never allocated.
"""
import torch
import transformers
from torch import nn


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-k linear map stored as two matrices."""

    def __init__(self, in_features, out_features, rank, bias=False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_compressed_modules(model: nn.Module, entry: dict) -> None:
    """Put the recorded compressed modules in place of the dense linears (same device and
    dtype as the linear they replace: meta while transformers loads a checkpoint)."""
    for name, rank in (entry.get("ranks") or {}).items():
        dense = model.get_submodule(name)
        model.set_submodule(name, LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                                bias=dense.bias is not None, dtype=dense.weight.dtype,
                                                device=dense.weight.device))
    for name, (out, inp) in (entry.get("shapes") or {}).items():
        dense = model.get_submodule(name)
        model.set_submodule(name, nn.Linear(int(inp), int(out), bias=dense.bias is not None,
                                            dtype=dense.weight.dtype, device=dense.weight.device))


def soco_class(base_name: str) -> type:
    """The base causal-LM class of transformers named `base_name`, with the swap after its init."""
    base = getattr(transformers, base_name)

    class SocoCompressed(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            swap_compressed_modules(self, getattr(config, "soco", None) or {})

    SocoCompressed.__name__ = SocoCompressed.__qualname__ = f"Soco{base_name}"
    return SocoCompressed


# the checkpoint's base class, written by soco when it wrote the checkpoint:
