"""CUDA-only checks, skipped without a GPU (CI has none; bench/gpu_check.sh runs them on one):
torch.compile(fullgraph) vs eager for every seed config in bf16, looping off and on, and
FlashAttention 3 vs SDPA on the one attention path."""
import sys

import pytest
import torch

from _util import ROOT, awake_model

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEED_CONFIGS = ["baseline", "pr473", "pr526", "pr573", "pr1550", "pr1812"]


def _batch(cfg, B=2, T=1024):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x[:, ::256] = cfg.bos_id
    return x[:, :-1].cuda(), x[:, 1:].cuda()


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(x, y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_compiled_matches_eager_in_bf16(name):
    cfg, _ = tg.load_config(str(ROOT / f"configs/{name}.toml"), {"train_seq_len": "1024"}, {})
    base = awake_model(cfg, 0.02).cuda()
    compiled = torch.compile(base, dynamic=False, fullgraph=True)  # fullgraph: a graph break is an error
    x, y = _batch(cfg)
    for looping in [False, True] if cfg.num_loops else [False]:
        base.looping = looping
        le, ge = _loss_and_grads(base, x, y)
        lc, gc = _loss_and_grads(compiled, x, y)
        assert abs(le - lc) < 1e-2 * le, (name, looping, le, lc)
        assert torch.nn.functional.cosine_similarity(ge, gc, dim=0) > 0.99, (name, looping)


@pytest.mark.parametrize("kv_heads", [8, 4, 1])
def test_fa3_matches_sdpa(kv_heads):
    if tg._fa3 is None:
        pytest.skip("flash_attn_interface (FA3) not importable")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 2048, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2048, kv_heads, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    fa3, sdpa = tg.attention(q, k, v, None, fa3=True), tg.attention(q, k, v, None, fa3=False)
    assert (fa3.float() - sdpa.float()).abs().max().item() < 2e-2


def test_attn_backend_sdpa_is_obeyed(monkeypatch):
    calls = []
    monkeypatch.setattr(tg, "_fa3", lambda *a, **k: calls.append(1))
    cfg, _ = tg.load_config(None, {"attn_backend": "sdpa", "num_layers": "2", "vocab_size": "64"}, {})
    model = tg.GPT(cfg).cuda()
    x, _ = _batch(cfg, 1, 64)
    with torch.autocast("cuda", torch.bfloat16):
        model(x)
    assert not calls
