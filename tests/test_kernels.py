"""The fused kernels of kernels.py (issue 15 item 7, spec sota-1855 §6) against the eager path.

- Interpreter tests: the Triton kernels on CPU through TRITON_INTERPRET=1, in one subprocess
  (the variable must be set before triton is imported; this process may have imported it already),
  skipped when triton is not importable. References are fp32 eager math on the same dtype-rounded inputs.
- CUDA tests (skipped without a GPU; bench/gpu_check.sh runs them): the compiled kernels at the record's
  shapes, and a torch.compile(fullgraph) model with both keys on vs off.
- Fallback tests: on CPU without the interpreter the keys change nothing and the startup line is loud.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from _util import ROOT, awake_model, read_log, run_train, tiny_args

sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402
import train_gpt as tg  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Tolerances. Losses are fp32 math from the same inputs in every dtype: 1e-4 absolute. Relative (norm)
# errors: fp32 1e-5; bf16 outputs/gradients are rounded to bf16 once (2^-8 relative), and the interpreter
# TRUNCATES fp32 -> bf16 casts (a GPU rounds to nearest), so up to 2^-7 per element: 2e-2 under the
# interpreter, 1.5e-2 on CUDA (bf16 matmul inputs, fp32 accumulation).
TOL = {"fp32": 1e-5, "bf16": 2e-2}


@pytest.fixture(scope="module")
def interp():
    if not HAS_TRITON:
        pytest.skip("triton is not importable (pip install triton): the interpreter tests need it")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    p = subprocess.run([sys.executable, str(ROOT / "tests/_kernels_interp.py")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["7x300", "5x2500", "3x1024"])  # V < block, V = 2.4 blocks, V = one block
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softcap_ce_kernel_matches_eager(interp, dtype, shape, reduction):
    r = interp[f"ce_{dtype}_{shape}_{reduction}"]
    assert r["loss"] < 1e-4, r
    assert r["grad"] < TOL[dtype], r
    assert r["grad_dtype_ok"] == 1.0, "the logits' gradient must have the logits' dtype"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["37x48x200", "130x64x256"])  # M x d x F: none a multiple of the tiles
@pytest.mark.parametrize("act", ["lrelu2", "relu2"])
def test_fused_mlp_kernel_matches_eager(interp, dtype, shape, act):
    r = interp[f"mlp_{dtype}_{shape}_{act}"]
    assert all(v < TOL[dtype] for v in r.values()), r


def test_model_with_kernels_matches_eager_model(interp):
    """One model path: fused_ce + fused_mlp on vs off, same tiny GPT and batch (fp32), mean and per-token losses."""
    r = interp["model_fp32"]
    assert r["loss"] < 1e-5 and r["per_token"] < 1e-4 and r["grads"] < 1e-4, r


@pytest.mark.parametrize("packer", ["lzma", "minify_brotli"])
def test_packed_kernels_run(tmp_path, packer):
    """The shipped (self-extracting) kernels.py: its code is exec'd from a string, so triton cannot read the kernels'
    source from a file, and pyminify strips the tl.constexpr annotations; both must survive packing."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    if packer == "minify_brotli":
        pytest.importorskip("python_minifier")
    import quantize as q

    q.pack_files(ROOT, tmp_path, packer)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("TRITON_INTERPRET", None)
    compiled = subprocess.run([sys.executable, "-c", "import kernels; assert kernels.load(); print(kernels.__file__)"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # defines triton.jit kernels
    assert compiled.returncode == 0 and compiled.stdout.strip() == str(tmp_path / "kernels.py"), compiled.stderr[-2000:]
    p = subprocess.run([sys.executable, str(ROOT / "tests/_kernels_interp.py"), str(tmp_path)], env={**env, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["kernels_file"] == str(tmp_path / "kernels.py")
    assert r["ce_bf16_5x2500_none"]["grad"] < TOL["bf16"] and r["mlp_fp32_130x64x256_lrelu2"]["grad_x"] < TOL["fp32"], r
    assert r["model_fp32"]["grads"] < 1e-4, r


def test_ttt_loss_is_the_models_loss_call(monkeypatch):
    """The TTT trainer (legal TTT, phased TTT's global SGD) takes its loss from the model's one loss call, so
    fused_ce reaches it; with a z-loss it needs the logits and stays eager."""
    import torch.nn.functional as F

    import ttt_eval as te

    cfg, _ = te.resolve_config({}, None, {"vocab_size": "300", "model_dim": "64", "num_heads": "2", "num_kv_heads": "1",
                                          "num_layers": "2", "fused_ce": "1"})
    model, rt = awake_model(cfg), tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    seen, real = [], kernels.softcap_ce
    monkeypatch.setattr(kernels, "softcap_ce", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    loss = te.Adapter(model, model, cfg, rt).loss(x[:, :-1], x[:, 1:])
    assert seen == [True]
    assert torch.allclose(loss, F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten()))
    cfg.ttt_zloss = 1e-4
    assert te.Adapter(model, model, cfg, rt).loss(x[:, :-1], x[:, 1:]) > loss and seen == [True]


needs_cpu_eager = pytest.mark.skipif(kernels.INTERPRET, reason="TRITON_INTERPRET=1 in this process: CPU tensors run the kernels")


@needs_cpu_eager
def test_keys_fall_back_to_eager_on_cpu():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 9, 300, generator=g, requires_grad=True), torch.randint(0, 300, (2, 9), generator=g)
    for red in ("mean", "none"):
        assert torch.equal(kernels.softcap_ce(x, t, 30.0, red, fused=True), kernels.softcap_ce(x, t, 30.0, red, fused=False))
    u, wu, wd = torch.randn(2, 9, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(16, 40, generator=g)
    for act in ("relu2", "lrelu2", "silu2"):
        assert torch.equal(kernels.mlp(u, wu, wd, act, 0.5, fused=True), kernels.mlp(u, wu, wd, act, 0.5, fused=False))


@needs_cpu_eager
def test_backend_line_is_loud_on_fallback(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.backend_line(False, False, "lrelu2", cpu) == ""
    line = kernels.backend_line(True, True, "lrelu2", cpu)
    assert line.startswith("fused_kernels: ce:eager mlp:eager WARNING:") and "not on CUDA" in line
    monkeypatch.setattr(kernels, "_K", False)  # triton missing
    assert "triton not importable" in kernels.backend_line(True, False, "lrelu2", cuda)
    monkeypatch.setattr(kernels, "_K", {})  # triton present: only silu2 falls back
    assert kernels.backend_line(True, True, "lrelu2", cuda) == "fused_kernels: ce:triton mlp:triton"
    line = kernels.backend_line(False, True, "silu2", cuda)
    assert "mlp:eager WARNING" in line and "mlp_act=silu2" in line


@needs_cpu_eager
def test_train_logs_fallback_and_matches_eager(sample_data, tmp_path):
    """A CPU run with both keys on logs the loud line and trains exactly as the run with them off."""
    losses = {}
    for on in (0, 1):
        run_train(tiny_args(sample_data, iterations=2, mlp_act="lrelu2", fused_ce=on, fused_mlp=on, run_id=f"k{on}"), tmp_path)
        log = read_log(tmp_path, f"k{on}")
        assert ("fused_kernels: ce:eager mlp:eager WARNING" in log) == bool(on)
        losses[on] = [ln for ln in log.splitlines() if ln.startswith("step:") and "train_loss" in ln]
    assert losses[0] and [ln.split(" train_time")[0] for ln in losses[0]] == [ln.split(" train_time")[0] for ln in losses[1]]


# -- CUDA: the compiled kernels ---------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@pytest.mark.parametrize("n,v", [(4096, 8192), (333, 1000)])
def test_cuda_softcap_ce(n, v):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, v, device="cuda", generator=g) * 20).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    xk, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    lk = kernels.softcap_ce(xk, t, 30.0, "mean", fused=True)
    lr = torch.nn.functional.cross_entropy(30 * torch.tanh(xr / 30), t)
    lk.backward()
    lr.backward()
    assert abs(lk.item() - lr.item()) < 1e-4 and _rel(xk.grad, xr.grad) < 1e-2


@cuda
@pytest.mark.parametrize("m,d,f", [(4096, 512, 2048), (1000, 512, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_fused_mlp(m, d, f, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the cuBLAS matmuls in full fp32, as the kernel's dot
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, d, device="cuda", generator=g)
    wu, wd = torch.randn(f, d, device="cuda", generator=g) / d**0.5, torch.randn(d, f, device="cuda", generator=g) / f**0.5
    up = torch.randn(m, d, device="cuda", generator=g)
    k = [a.to(dtype).requires_grad_() for a in (x, wu, wd)]
    r = [a.to(dtype).double().requires_grad_() for a in (x, wu, wd)]
    (kernels.mlp(*k, "lrelu2", 0.5, fused=True) * up.to(dtype)).sum().backward()
    yr = kernels.mlp(*r, "lrelu2", 0.5, fused=False)
    (yr * up.double()).sum().backward()
    tol = 1.5e-2 if dtype == torch.bfloat16 else 1e-4
    assert all(_rel(a.grad, b.grad) < tol for a, b in zip(k, r))


@cuda
def test_cuda_compiled_model_with_kernels():
    """The pr1855 model in bf16 with both keys on, eager and torch.compile(fullgraph), vs eager with both off
    (test_gpu.py's criteria: loss within 1%, gradient cosine > 0.99)."""
    cfg, _ = tg.load_config(str(ROOT / "configs/pr1855.toml"), {"train_seq_len": "1024"}, {})
    x = torch.randint(0, cfg.vocab_size, (2, 1025), generator=torch.Generator().manual_seed(0)).cuda()
    out = {}
    for name, on, comp in (("eager", False, False), ("fused", True, False), ("fused_compiled", True, True)):
        cfg.fused_ce = cfg.fused_mlp = on
        base = awake_model(cfg, 0.02).cuda()
        model = torch.compile(base, dynamic=False, fullgraph=True) if comp else base
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        out[name] = (loss.item(), torch.cat([p.grad.float().flatten() for p in base.parameters() if p.grad is not None]))
    le, ge = out["eager"]
    for name in ("fused", "fused_compiled"):
        lf, gf = out[name]
        assert abs(lf - le) < 1e-2 * le and torch.nn.functional.cosine_similarity(ge, gf, dim=0) > 0.99, (name, lf, le)
