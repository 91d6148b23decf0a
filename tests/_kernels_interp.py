"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported):
the Triton kernels of kernels.py on CPU tensors through triton's interpreter against fp32 eager math
on the same (dtype-rounded) inputs. Prints one JSON object {case: {metric: error}}.
  TRITON_INTERPRET=1 python3 tests/_kernels_interp.py [PACKED_DIR]"""
import json
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if len(sys.argv) > 1:  # a directory of packed (self-extracting) code files: their kernels.py and train_gpt.py
    sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def ce_case(dt, n, v, reduction, c=30.0):
    g = torch.Generator().manual_seed(n * v)
    x = (torch.randn(n, v, generator=g) * 20).to(dt)  # scale 20: the softcap saturates on part of the row
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = v - 1  # a target in the last, partial block
    w = torch.randn(n, generator=g)
    xk, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    lk = kernels.softcap_ce(xk, t, c, reduction, fused=True)
    lr = F.cross_entropy(c * torch.tanh(xr / c), t, reduction=reduction)
    ((lk * w).sum() if reduction == "none" else lk).backward()
    ((lr * w).sum() if reduction == "none" else lr).backward()
    return {"loss": (lk - lr).abs().max().item(), "grad": rel(xk.grad, xr.grad), "grad_dtype_ok": float(xk.grad.dtype == dt)}


def mlp_case(dt, m, d, f, act):
    g = torch.Generator().manual_seed(m * d + f)
    x, wu, wd = torch.randn(m, d, generator=g), torch.randn(f, d, generator=g) / d**0.5, torch.randn(d, f, generator=g) / f**0.5
    up = torch.randn(m, d, generator=g)
    xs = [a.to(dt) for a in (x, wu, wd)]
    k = [a.clone().requires_grad_() for a in xs]
    r = [a.float().requires_grad_() for a in xs]
    yk = kernels.mlp(*k, act, 0.5, fused=True)
    yr = kernels.mlp(*r, act, 0.5, fused=False)
    (yk * up.to(dt)).sum().backward()
    (yr * up).sum().backward()
    out = {"out": rel(yk, yr)}
    out.update({f"grad_{n}": rel(a.grad, b.grad) for n, a, b in zip(("x", "w_up", "w_down"), k, r)})
    return out


def model_case():
    """The wiring: a tiny GPT with both keys on (kernels) vs off (eager), fp32, same weights and batch."""
    import train_gpt as tg
    from _util import awake_model

    cfg, _ = tg.load_config(None, {"vocab_size": "300", "model_dim": "64", "num_heads": "2", "num_kv_heads": "1",
                                   "num_layers": "2", "mlp_act": "lrelu2"}, {})
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    out = {}
    for fused in (False, True):
        cfg.fused_ce = cfg.fused_mlp = fused
        model = awake_model(cfg)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        out[fused] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        with torch.no_grad():
            out[(fused, "none")] = model(x[:, :-1], x[:, 1:], reduction="none")
    return {"loss": (out[True][0] - out[False][0]).abs().item(), "grads": rel(out[True][1], out[False][1]),
            "per_token": (out[(True, "none")] - out[(False, "none")]).abs().max().item()}


def main():
    torch.manual_seed(0)
    res = {"kernels_file": kernels.__file__}
    for dn, dt in DTYPES.items():
        for n, v in ((7, 300), (5, 2500), (3, 1024)):  # one partial block; 3 blocks, the last partial; exactly one block
            for red in ("none", "mean"):
                res[f"ce_{dn}_{n}x{v}_{red}"] = ce_case(dt, n, v, red)
        for m, d, f in ((37, 48, 200), (130, 64, 256)):  # nothing a multiple of the 128x128x64 tiles; M over one tile
            for act in ("lrelu2", "relu2"):
                res[f"mlp_{dn}_{m}x{d}x{f}_{act}"] = mlp_case(dt, m, d, f, act)
    res["model_fp32"] = model_case()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
