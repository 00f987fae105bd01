"""Figures of a SoCo run, written to `plots/` in the run folder (matplotlib, Agg)."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from soco.ranks import uniform_rank  # noqa: E402


def _save(store, rel: str, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    store.write_bytes(rel, buf.getvalue())


def plot_learning(store, curve: list[dict], boundaries: list[int], scores: dict[str, torch.Tensor], plan,
                  final_ranks: dict[str, int], keep: dict[str, torch.Tensor], layers_name: str,
                  frozen_at: int = -1) -> None:
    # 1. training curve
    steps = [e["step"] for e in curve]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [e["kl"] for e in curve], label="train KL", color="tab:blue", lw=1)
    hold = [(e["step"], e["holdout_kl"]) for e in curve if "holdout_kl" in e]
    if hold:
        ax.plot(*zip(*hold), "o-", label="held-out KL", color="tab:green", ms=3)
    hidden = [(e["step"], e["hidden"]) for e in curve if "hidden" in e]
    if hidden:  # soco.hidden_layers: the hidden-state distance trained beside the KL
        ax.plot(*zip(*hidden), label="train hidden-state distance", color="tab:purple", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(dense || compressed)" + (" / hidden-state distance" if hidden else ""))
    ax.set_yscale("log")
    ax2 = ax.twinx()
    target = store.read_json("learn.json")["budget_params"] if store.exists("learn.json") else None
    soft = [e["soft_count"] / target if target else e["soft_count"] for e in curve]
    ax2.plot(steps, soft, color="tab:red", lw=1, label="parameter count / budget")
    ax2.set_ylabel("parameter count / budget (soft; exact once pruning starts)", color="tab:red")
    marks = list(zip(boundaries, ["refine", "sparsify", "done"]))
    if frozen_at > 0:
        marks.append((frozen_at, "final cut"))
    for b, name in marks:
        ax.axvline(b, color="gray", ls="--", lw=0.8)
        ax.text(b, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="gray")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("SoCo training: coarse -> refine -> sparsify")
    _save(store, "plots/training_curve.png", fig)

    # 2. learned score against component index for a few matrices
    names = sorted(final_ranks)
    n_layers = 1 + max(int(n[len(layers_name) + 1:].split(".")[0]) for n in names)
    picks = []
    for layer, proj in [(0, "self_attn.q_proj"), (n_layers // 2, "mlp.down_proj"), (n_layers - 1, "self_attn.v_proj"),
                        (n_layers // 2, "mlp.gate_proj")]:
        name = f"{layers_name}.{layer}.{proj}"
        if name in scores:
            picks.append(name)
    if not picks:
        picks = names[:4]
    fig, axes = plt.subplots(len(picks), 1, figsize=(8, 2.2 * len(picks)), squeeze=False)
    for ax, name in zip(axes[:, 0], picks):
        s = scores[name].abs()
        kept = torch.zeros_like(s, dtype=torch.bool)
        kept[keep[name]] = True
        idx = torch.arange(s.numel())
        ax.scatter(idx[kept], s[kept], s=4, color="tab:blue", label="kept")
        ax.scatter(idx[~kept], s[~kept], s=4, color="tab:red", label="pruned")
        ax.set_title(f"{name}: {int(kept.sum())}/{s.numel()} kept", fontsize=9)
        ax.set_ylabel("|score|")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("component index (by singular value, largest first)")
    fig.tight_layout()
    _save(store, "plots/scores.png", fig)

    # 3. ranks allocated per layer and projection
    projs = sorted({n[len(layers_name) + 1:].split(".", 1)[1] for n in names})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for proj in projs:
        ys = [final_ranks.get(f"{layers_name}.{i}.{proj}") for i in range(n_layers)]
        line, = ax.plot(range(n_layers), ys, marker="o", ms=3, label=proj)
        m, n = plan.shapes[f"{layers_name}.0.{proj}"]
        ax.axhline(uniform_rank(m, n, store.read_json("plan.json")["ratio"]), color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("rank kept")
    ax.set_title("Ranks allocated by SoCo (dotted: uniform rank at the same ratio)")
    ax.legend(fontsize=7, ncol=2)
    _save(store, "plots/ranks.png", fig)
