"""Experiment (issue 14): a sequential least-squares refit of a compressed checkpoint's U factors.

Layer by layer, in the order a decoder layer feeds its linears (q/k/v, o, gate/up, down),
each low-rank matrix's U (`up`) is re-solved so that, fed the compressed model's own
activations X_c, it reproduces the dense matrix's output on the dense activations X_d:
    U = argmin ||W X_d - U A X_c||^2 (+ ridge)  =  W G_dc A^T (A G_cc A^T + ridge)^-1,
with A = the kept rows of V' (`down`), G_cc = X_c X_c^T and G_dc = X_d X_c^T summed over the
64 x 512 calibration windows of the bundled wiki text. Prints the perplexity on the held-out
wiki half and two other texts before and after. Whole models in memory: small models only.

    .venv/bin/python bench/sequential_refit.py CHECKPOINT [RIDGE]

Measured on soco's r=0.4 checkpoint: bench/results/sequential_refit.log (every text worse).
"""
import sys, time, math, torch
from torch import nn
from transformers import AutoTokenizer
from pipeline.bundled import bundled_model_dir
from pipeline.checkpoint import load_dense, load_compressed
from pipeline.data import load_windows
from soco.lowrank import LowRankLinear

torch.set_num_threads(2)
ckpt = sys.argv[1]; ridge = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-4
mdir = bundled_model_dir("smollm2-135m")
tok = AutoTokenizer.from_pretrained(mdir)
dense = load_dense(mdir).eval(); comp = load_compressed(ckpt).eval()
w = load_windows("bundled:wiki", "text", tok, 64, 512, 32)
texts = {"wiki": w.eval, "code": load_windows("bundled:code", "text", tok, 1, 512, 32).eval,
         "c4": load_windows("bundled:c4", "text", tok, 1, 512, 32).eval}
B = 8

@torch.no_grad()
def ppl(model, win):
    nll, n = 0.0, 0
    for i in range(0, win.shape[0], B):
        x = win[i:i+B]; lg = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += float(nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")); n += x[:, 1:].numel()
    return math.exp(nll / n)

def layers(m): return m.model.layers
# capture layer kwargs and layer-0 inputs
caps = []
def pre(mod, args, kwargs):
    caps.append((args[0] if args else kwargs["hidden_states"], {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}))
    raise StopIteration
@torch.no_grad()
def embed(model, win):
    h = layers(model)[0].register_forward_pre_hook(pre, with_kwargs=True)
    out = []
    for i in range(0, win.shape[0], B):
        caps.clear()
        try: model.model(input_ids=win[i:i+B], use_cache=False)
        except StopIteration: pass
        out.append(caps[0])
    h.remove(); return out

if "--eval-only" not in sys.argv:
    t0 = time.time()
    print("before", {k: round(ppl(comp, v), 2) for k, v in texts.items()}, flush=True)
    bd = embed(dense, w.calib); bc = embed(comp, w.calib)
    hd = [b[0] for b in bd]; hc = [b[0] for b in bc]; kw = [b[1] for b in bd]
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    with torch.no_grad():
        for li, (Ld, Lc) in enumerate(zip(layers(dense), layers(comp))):
            for g in groups:
                md, mc = Ld.get_submodule(g[0]), Lc.get_submodule(g[0])
                xs = {}
                hk = [md.register_forward_pre_hook(lambda m, a: xs.__setitem__("d", a[0])), mc.register_forward_pre_hook(lambda m, a: xs.__setitem__("c", a[0]))]
                n = md.in_features; Gcc = torch.zeros(n, n, dtype=torch.float64); Gdc = torch.zeros(n, n, dtype=torch.float64)
                for b in range(len(hd)):
                    Ld(hd[b], **kw[b]); Lc(hc[b], **kw[b])
                    xd = xs["d"].reshape(-1, n).double(); xc = xs["c"].reshape(-1, n).double()
                    Gcc += xc.T @ xc; Gdc += xd.T @ xc
                for h_ in hk: h_.remove()
                for name in g:
                    W = Ld.get_submodule(name).weight.double(); mod = Lc.get_submodule(name)
                    if not isinstance(mod, LowRankLinear): continue
                    A = mod.down.weight.double()
                    M = A @ Gcc @ A.T
                    M += ridge * M.diagonal().mean() * torch.eye(M.shape[0], dtype=M.dtype)
                    R = W @ Gdc @ A.T
                    mod.up.weight.copy_(torch.linalg.solve(M, R.T).T.float())
            for b in range(len(hd)):
                hd[b] = Ld(hd[b], **kw[b]); hd[b] = hd[b][0] if isinstance(hd[b], tuple) else hd[b]
                hc[b] = Lc(hc[b], **kw[b]); hc[b] = hc[b][0] if isinstance(hc[b], tuple) else hc[b]
            print("layer", li, round(time.time() - t0), "s", flush=True)
    print("after", {k: round(ppl(comp, v), 2) for k, v in texts.items()}, flush=True)
print("dense", {k: round(ppl(dense, v), 2) for k, v in texts.items()}, flush=True)
