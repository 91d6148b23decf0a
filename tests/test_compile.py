"""Compiled = eager without a GPU: for every seed config at a tiny shape, the train step (model and
Newton-Schulz compiled as train_gpt.main compiles them on CUDA), the eval forward and one legal TTT
chunk (score, train, score the next) give the eager results, with no graph break (fullgraph=True makes
one an error) and no recompilation once each path has run once (counted, and made an error).

What CI covers (default PG_COMPILE_BACKEND=eager): dynamo captures every path of all 6 seed configs and
runs the captured graphs with eager kernels. That catches graph breaks, recompiles and Python state the
capture freezes (the records' dead late-QAT branch was one); it runs no code generator. Measured on the
shared 2-core dev machine: 85 s of CPU for all 6 (the wall time there was 400 s under other jobs' load).
PG_COMPILE_BACKEND=aot_eager adds AOTAutograd's traced joint forward/backward (221 s CPU, all 6 pass).
PG_COMPILE_BACKEND=inductor is the real CPU compiler (C++ through gcc): about 3 min of CPU per config, so
not in CI; baseline, pr473 and pr1812 measured: fp32 losses/scores within 5e-5, weights within 7.2e-3.
pr526, pr573 and pr1550 FAIL under inductor (measured 2026-12-06; no graph break, no recompile): the loss
of the first step agrees to 2e-6, but after one optimizer step the eval differs by 2.6e-4 / 9.9e-5 /
2.8e-4 and after the run by 5.4e-4 / 6.7e-4 / 1.8e-3 (weights 8.0e-2 / 3.2e-2 / 2.9e-2 of the largest
value). Not yet explained. It is not the compiled Newton-Schulz: pr573 fails the same with NS left eager
(eval after the run 1.1e-3, weights 3.2e-2); the compiled backward's gradients, amplified by the bf16
Newton-Schulz every Muon step, are the suspect, unproven.
It runs with inductor's emulate_precision_casts (bf16 intermediates rounded as eager rounds them); with
PG_COMPILE_EMULATE_CASTS=0 the weights after the steps differ by 5e-2 of their largest value (baseline),
because fused kernels keep Newton-Schulz's bf16 intermediates in fp32: a rounding difference, not a bug."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from _util import ROOT, awake_model

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
import ttt_eval as te  # noqa: E402

BACKEND = os.environ.get("PG_COMPILE_BACKEND", "eager")
if BACKEND == "inductor":  # round bf16 intermediates as eager does (Newton-Schulz runs in bf16); see the docstring
    torch._inductor.config.emulate_precision_casts = os.environ.get("PG_COMPILE_EMULATE_CASTS", "1") == "1"
SEED_CONFIGS = ["baseline", "pr473", "pr526", "pr573", "pr1550", "pr1812"]
T, B = 32, 2
# model_dim 128 keeps head_dim >= rope_dims (16) at 8 heads; layer counts and per-layer techniques stay the config's
TINY = {"train_seq_len": T, "train_batch_tokens": B * T, "virtual_world_size": 1, "model_dim": 128, "vocab_size": 96,
        "bigram_dim": 32, "ve_dim": 32, "device": "cpu", "autocast_dtype": "fp32", "eval_seq_len": T, "eval_stride": 16,
        "eval_batch_seqs": 4, "ttt_chunk_tokens": 2 * T, "ttt_batch_seqs": 2, "ttt_epochs": 1}
# relative to the largest |value|: losses and scores are fp32 (inductor measured 6e-6); weights after 2-4 steps and a TTT step
# carry Muon's bf16 Newton-Schulz, where another summation order moves an update by a bf16 ulp (2^-8; measured 3.6e-3)
TOL, TOL_PARAMS = 1e-4, 1e-2


class Batches:
    def __init__(self, n, vocab):
        g = torch.Generator().manual_seed(1)
        self.items, self.i = [torch.randint(0, vocab, (B * T + 1,), generator=g) for _ in range(n)], 0

    def next_batch(self, tokens, seq_len):
        t = self.items[self.i % len(self.items)]
        self.i += 1
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


def setup(name, compiled):
    cfg, _ = tg.load_config(str(ROOT / f"configs/{name}.toml"), {k: str(v) for k, v in TINY.items()}, {})
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)
    base = awake_model(cfg, 0.02)
    opt = tg.Optimizer(base, cfg, rt)
    model = base
    if compiled:
        model = torch.compile(base, backend=BACKEND, dynamic=False, fullgraph=True)
        opt.ns = torch.compile(tg.orthogonalize, backend=BACKEND, fullgraph=True)
    return SimpleNamespace(cfg=cfg, rt=rt, base=base, model=model, opt=opt, loader=Batches(4, cfg.vocab_size))


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def exercise(r, tbytes, tokens):
    """Warm every path (and looping state), then the counted run: returns what is compared."""
    states = [False, True] if r.cfg.num_loops else [False]
    out = {}
    for phase in ("warm", "run"):
        if phase == "run":
            counters.clear()
            torch._dynamo.config.error_on_recompile = True
        try:
            for looping in states:
                r.base.looping = looping
                out[f"loss{looping}{phase}"] = tg.train_step(r, 1.0, 0.95)
                out[f"eval{looping}{phase}"] = tg.eval_val(r.cfg, r.model, r.rt, tokens, tbytes)[0]
            wins = te.windows(tokens.numel(), T, r.cfg.eval_stride)
            out[f"ttt{phase}"] = te.legal_ttt(r.cfg, r.base, r.model, tokens, wins, tbytes, r.rt, None).sums
        finally:
            torch._dynamo.config.error_on_recompile = False
    out["params"] = torch.cat([p.detach().flatten() for p in r.base.parameters()])
    out["graphs_after_warmup"] = counters["stats"]["unique_graphs"]
    out["breaks"] = sum(counters["graph_break"].values())
    return out


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_compiled_equals_eager_on_cpu(name):
    torch._dynamo.reset()
    V = TINY["vocab_size"]
    tokens = torch.randint(0, V, (3 * T + 1,), generator=torch.Generator().manual_seed(2), dtype=torch.int64)
    tbytes = torch.ones(tokens.numel(), dtype=torch.int32)  # one byte per target (val_target_bytes' shape)
    eager = exercise(setup(name, False), tbytes, tokens)
    comp = exercise(setup(name, True), tbytes, tokens)
    assert comp["breaks"] == 0 and comp["graphs_after_warmup"] == 0, (name, comp["breaks"], comp["graphs_after_warmup"])
    diffs = {k: close(torch.as_tensor(comp[k]).double(), torch.as_tensor(eager[k]).double())
             for k in eager if k not in ("graphs_after_warmup", "breaks")}
    print(f"compile_check {name} backend:{BACKEND} max_rel_diff:{max(diffs.values()):.2e} " + " ".join(f"{k}:{v:.1e}" for k, v in diffs.items()))
    assert all(v <= (TOL_PARAMS if k == "params" else TOL) for k, v in diffs.items()), (name, diffs)
