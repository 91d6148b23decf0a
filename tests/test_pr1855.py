"""The PR #1855 record (shared/specs/sota-1855.md sections 1, 2, 7.1) as configs/pr1855.toml: parameter count
and inventory, the parallel lanes and the sparse gate computed by hand, the layer lists, the LR floor and
momentum schedule, the warmup phases and the Muon momentum they leave, bf16 gradient averaging over 2 ranks,
and a tiny-width run of the config on CaseOps sample data."""
import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import prepare
from _util import ROOT, awake_model, read_log, run_train, tiny_args
from test_optim import _worker, small_cfg, synthetic_grads

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

CONFIG = str(ROOT / "configs" / "pr1855.toml")
TINY = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=96, train_seq_len=24, rope_dims=8, ln_scale=1,
            xsa_last_n=2, skip_gates=1, parallel_start=1, parallel_mode="two_lane", lane_skip="lane0", attn_gate="sparse",
            attn_gate_scale=0.5, smear="v3")


def cfg_of(path=CONFIG, **over):
    return tg.load_config(path, {k: str(v) for k, v in over.items()}, {})[0]


def shrunk(**over):
    """configs/pr1855.toml's structure (11 layers, loops, lanes, gates) at tiny width."""
    return cfg_of(model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=96, rope_dims=8, train_seq_len=24, **over)


def test_dry_run_prints_the_record_param_count():
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--config", CONFIG, "--dry-run"],
                       capture_output=True, text=True, check=True)
    assert p.stdout.splitlines()[0] == "model_params:35945671"


def test_inventory_and_init_of_the_spec():
    """Section 1.1: every tensor's shape and initial value (the dry-run count alone could hide a swap)."""
    torch.manual_seed(0)
    m = tg.GPT(cfg_of())
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["tok_emb.weight"] == (8192, 512) and shapes["qo_bank"] == (22, 512, 512) and shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 2048, 512) and shapes["mlp_down_bank"] == (11, 512, 2048)
    assert shapes["q_gain"] == (11, 8, 1) and bool((m.q_gain == 5.0).all())
    assert shapes["skip_weights"] == shapes["skip_gates"] == (8, 512) and bool((m.skip_weights == 1).all() and (m.skip_gates == 0).all())
    assert m.parallel_post_lambdas.shape == (11, 2, 2) and bool((m.parallel_post_lambdas == 1).all())
    assert m.parallel_resid_lambdas.shape == (11, 2) and torch.allclose(m.parallel_resid_lambdas, torch.tensor(1.1))
    assert shapes["smear_w"] == (1, 12) and shapes["smear_lambda"] == (1,) and not m.smear_w.any() and not m.smear_lambda.any()
    for b in m.blocks:
        assert b.attn_gate_w.shape == (8, 12) and not b.attn_gate_w.any()
        assert b.resid_mix[0].eq(1).all() and b.resid_mix[1].eq(0).all() and b.ln == pytest.approx(1 / math.sqrt(b.i + 1))
    assert not m.qo_bank[11:].any() and not m.mlp_down_bank.any()  # O and down projections start at zero
    assert m.lm_head is None and not hasattr(m, "bigram") and not hasattr(m, "ve")
    assert abs(m.tok_emb.weight.std().item() - 0.005) < 1e-4


def test_layer_lists_skips_and_lanes():
    """Section 1.3: the 17-pass schedule split 8 / 9, 8 skips, lanes from physical layer 8."""
    cfg = shrunk()
    looped, plain = tg.layer_order(cfg, True), tg.layer_order(cfg, False)
    assert looped[: len(looped) // 2] == [0, 1, 2, 3, 4, 5, 3, 4] and looped[len(looped) // 2 :] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert plain[: len(plain) // 2] == [0, 1, 2, 3, 4] and plain[len(plain) // 2 :] == [5, 6, 7, 8, 9, 10]
    m = tg.GPT(cfg)
    assert m.n_skips == 8 and [b.i for b in m.blocks if b.parallel] == [8, 9, 10]


def test_two_lane_forward_by_hand():
    """Sections 1.4-1.5 on a 2-layer model (layer 1 parallel): the sequential block's residual base is the
    mixed input; the skip merges into lane 0 after the split; attention reads resid-mixed lane 0 while
    lane 0's residual base stays un-mixed; the MLP reads lane 1 with no x0 mix; output = mean of lanes."""
    cfg = cfg_of(None, **TINY)
    model = awake_model(cfg).eval()
    ids = torch.randint(2, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    b0, b1 = model.blocks
    sig = torch.sigmoid
    with torch.no_grad():
        ctx = {"rope": model.rope(24, "cpu")}
        x0 = model.embed(ids)
        xin = b0.resid_mix[0] * x0 + b0.resid_mix[1] * x0
        xmid = xin + b0.attn(model, xin, ctx)
        x1 = xmid + b0.mlp(model, xmid)
        g, w = sig(model.skip_gates[0]), model.skip_weights[0]
        lane0, lane1 = g * x1 + (1 - g) * w * x1, x1
        a = b1.attn(model, b1.resid_mix[0] * lane0 + b1.resid_mix[1] * x0, ctx)
        mlp = b1.mlp(model, lane1)
        r, P = model.parallel_resid_lambdas[1], model.parallel_post_lambdas[1]
        out0 = r[0] * lane0 + P[0, 0] * a + P[1, 0] * mlp
        out1 = r[1] * lane1 + P[0, 1] * a + P[1, 1] * mlp
        h = tg.rms_norm((out0 + out1) / 2)
        want = 30 * torch.tanh(h @ model.tok_emb.weight.T / 30)
        got = model(ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        stream = awake_model(cfg_of(None, **{**TINY, "lane_skip": "stream"})).eval()(ids)
        assert not torch.allclose(stream, want, atol=1e-3)  # the hand computation tells the two skip rules apart


def test_sparse_gate_scale_inside_the_sigmoid():
    """Section 1.6.7: y_h <- y_h * sigmoid(0.5 * W[h] . n[:12]), n = the normed, ln-scaled attention input.
    With equal rows of W the gate is one scalar per token, so it factors out of the out-projection."""
    cfg = cfg_of(None, **{**TINY, "gate_window": 12})
    gated = awake_model(cfg)
    plain = tg.GPT(cfg_of(None, **{**TINY, "attn_gate": "none"}))
    plain.load_state_dict(gated.state_dict(), strict=False)
    w = torch.randn(12, generator=torch.Generator().manual_seed(2))
    x = 3 * torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(3))
    ctx = {"rope": gated.rope(24, "cpu")}
    b = gated.blocks[1]
    with torch.no_grad():
        b.attn_gate_w.copy_(w.expand(4, 12))
        base = plain.blocks[1].attn(plain, x, ctx)
        n = tg.rms_norm(x) / math.sqrt(2)  # layer 1: ln scale 1/sqrt(2)
        want = torch.sigmoid(0.5 * n[..., :12] @ w).unsqueeze(-1) * base
        assert torch.allclose(b.attn(gated, x, ctx), want, atol=1e-6)
        assert not torch.allclose(0.5 * torch.sigmoid(n[..., :12] @ w).unsqueeze(-1) * base, want, atol=1e-3)
        b.attn_gate_w.zero_()  # the record's zero init: every head's output is halved at step 0
        assert torch.allclose(b.attn(gated, x, ctx), 0.5 * base, atol=1e-6)


def test_lr_floor_and_momentum_schedule():
    """Section 2.4: frac = elapsed / (600 s - 0.5 s); flat below 0.15, (1 - frac) / 0.85 after, floor 0.1
    (reached at frac 0.915). Section 2.3: momentum 0.92 -> 0.97 over 1,500 steps."""
    cfg = cfg_of()
    budget = 599_500.0
    assert tg.train_budget_ms(cfg) == budget
    fracs = [0.0, 0.1, 0.15, 0.5, 0.9, 0.915, 0.95, 1.0, 1.2]
    want = [1.0, 1.0, 1.0, 0.5 / 0.85, 0.1 / 0.85, 0.1, 0.1, 0.1, 0.1]
    got = [tg.lr_multiplier(cfg, 1000, f * budget) for f in fracs]
    assert got == pytest.approx(want, abs=1e-9)
    assert [tg.muon_momentum(cfg, s) for s in (0, 750, 1500, 4000)] == pytest.approx([0.92, 0.945, 0.97, 0.97])


class _Loader:
    """Stands in for the token loader: records whether looping was on for each micro-batch it hands out."""

    def __init__(self, model, seen):
        self.model, self.seen = model, seen

    def next_batch(self, tokens, seq_len):
        self.seen.append(self.model.looping)
        x = torch.randint(2, 96, (2, seq_len), generator=torch.Generator().manual_seed(len(self.seen)))
        return x, x


@pytest.mark.parametrize("revert", [True, False])
def test_warmup_phases_then_revert(revert, monkeypatch):
    """Section 2.6: warmup_steps real steps unlooped, then as many looped, at LR multiplier 1; then weights,
    AdamW state and the loader start over. Muon's momentum is reset too, unless warmup_revert_momentum is
    off (the record's behaviour), in which case it is exactly what the 2 x warmup_steps steps left."""
    cfg = shrunk(warmup_steps=3, warmup_revert_momentum=int(revert))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 2)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    opt = tg.Optimizer(model, cfg, rt)
    seen, logged, loaders = [], [], []
    init = {k: v.clone() for k, v in model.state_dict().items()}
    parts = dict(cfg=cfg, rt=rt, log=logged.append, base=model, model=model, opt=opt, avg=tg.WeightAverage(model, cfg),
                 loader=_Loader(model, seen), out_dir=ROOT, sources={})
    r = tg.Run(**parts, **{f.name: None for f in dataclasses.fields(tg.Run) if f.name not in parts and f.default is dataclasses.MISSING})
    before_revert = {}
    load = opt.load_state_dict
    opt.load_state_dict = lambda s: (before_revert.update({n: b.clone() for n, b in opt.mom.items()}), load(s))
    lr_muls, step = [], tg.train_step
    monkeypatch.setattr(tg, "train_step", lambda r, lr_mul, mu: lr_muls.append(lr_mul) or step(r, lr_mul, mu))
    tg.warmup(r, lambda: loaders.append(_Loader(model, [])) or loaders[-1])
    assert lr_muls == [1.0] * 6
    assert seen == [False] * 6 + [True] * 6  # 3 steps x 2 micro-batches per phase
    assert logged[-1] == "warmup_step:3/3 looping:on" and not model.looping and r.loader is loaders[0]
    assert all(torch.equal(v, init[k]) for k, v in model.state_dict().items())
    assert all(not o.state for o in opt.adams)
    assert all(b.any() for b in before_revert.values())
    for n, b in opt.mom.items():
        assert torch.equal(b, torch.zeros_like(b) if revert else before_revert[n]), n


def test_bf16_gradient_average_over_two_ranks(tmp_path):
    """muon_grad_dtype=bf16 (section 2.3): each rank's bank gradient is rounded to bf16, averaged in bf16 by
    the reduce-scatter, then Muon runs in fp32: 2 gloo ranks equal, bit for bit, 1 process stepping on
    mean(bf16(g0), bf16(g1)); that reference differs from the fp32 average's, so the rounding is seen."""
    out = tmp_path / "two.pt"
    over = {"muon_grad_dtype": "bf16"}
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdv'}", str(out), over), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)["model"]

    def one_process(round_banks: bool) -> dict:
        torch.manual_seed(0)
        cfg = small_cfg(**over)
        model = tg.GPT(cfg)
        opt = tg.Optimizer(model, cfg, tg.Runtime(0, 1, 0, torch.device("cpu"), 1))
        for step in range(5):
            g0, g1 = synthetic_grads(model, step, 0), synthetic_grads(model, step, 1)
            for i, (name, p) in enumerate(model.named_parameters()):
                rounded = round_banks and name in tg.BANKS
                p.grad = ((g0[i].bfloat16() + g1[i].bfloat16()) / 2).float() if rounded else (g0[i] + g1[i]) / 2
            opt.step(lr_mul=1.0 - 0.1 * step, momentum=0.9)
            opt.zero_grad()
        return model.state_dict()

    ref, fp32 = one_process(True), one_process(False)
    for k, v in ref.items():
        assert torch.equal(two[k], v), k
    assert any(not torch.equal(ref[k], fp32[k]) for k in tg.BANKS)


def test_bad_grad_dtype_is_one_line():
    with pytest.raises(ValueError, match="muon_grad_dtype must be one of fp32, bf16; got 'fp16'"):
        cfg_of(None, muon_grad_dtype="fp16")


@pytest.fixture(scope="module")
def caseops_sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops_sample")
    assert prepare.main(["sample", "--caseops", "--out-root", str(root)]) == 0
    return {"data_path": root / "datasets" / "sample_caseops_sp512", "tokenizer_path": root / "tokenizers" / "sample_512_bpe_caseops.model",
            "vocab_size": 512}


def test_config_trains_end_to_end_at_tiny_width(caseops_sample, tmp_path):
    """configs/pr1855.toml at width 64 (all 11 layers, loops, lanes, gates, doc attention, EMA, GPTQ) on
    the CaseOps sample: warmup over both loop variants, the loop switches on at frac 0.35, scored over
    the original text's bytes, artifact round trip."""
    over = dict(num_layers=11, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, iterations=4, warmup_steps=1, train_seq_len=64,
                gptq_calib_batches=1, quant_keep_float_numel=1000, compressor="zlib", checkpoint_every=0, max_wallclock_seconds=0)
    run_train(["--config", CONFIG] + tiny_args(caseops_sample, **over) + ["--run_id=p1855"], tmp_path)
    log = read_log(tmp_path, "p1855")
    assert "warmup_step:1/1 looping:on" in log and re.search(r"^layer_loop:on step:2 frac:0.500 ", log, re.M)
    assert re.search(r"^val_bytes:\d+ from:caseops_sidecar", log, re.M)
    for group, bits in (("attn", 6), ("mlp", 6), ("embed", 7)):  # GPTQ with the record's bits and clip sigmas
        assert re.search(rf"^quant_table: {group} .* {bits} +sdclip k=[\d.]+ +gptq ", log, re.M), group
    assert re.search(r"^final_mixed_zlib_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)


def test_smoke_stack_trains_packs_scores_and_passes_the_legality_check(caseops_sample, tmp_path):
    """configs/smoke_pr1855.toml, shortened: CaseOps data + LQER-asym + int8 gates + pergroup + the minified
    code wrapper, then phased LoRA TTT (two global SGD phases inside the check's prefix) and --check-legality."""
    pytest.importorskip("zpaq")
    smoke = str(ROOT / "configs" / "smoke_pr1855.toml")
    data = [f"--data_path={caseops_sample['data_path']}", f"--tokenizer_path={caseops_sample['tokenizer_path']}", "--train_seq_len=128"]
    ev = ["--ttt_chunk_tokens=1024", "--ttt_phase_docs=2"]  # a 3,073-token check prefix that still holds both phases
    run_train(["--config", smoke, "--run_id=stack", "--iterations=4", "--train_batch_tokens=2048", "--gptq_calib_batches=1", *data],
              tmp_path, timeout=600)
    art = tmp_path / "runs" / "stack" / "final_model.mixed.ptz"
    for extra in ([], ["--check-legality"]):
        p = subprocess.run([sys.executable, str(ROOT / "ttt_eval.py"), "--artifact", str(art), "--config", smoke, "--run_id=stack", *data, *ev, *extra],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = read_log(tmp_path, "stack")
    assert re.search(r"^Code size: \d+ bytes \(packed .* packer minify_brotli", log, re.M)
    assert re.search(r"^final_mixed_pergroup_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)
    assert re.search(r"^ttt_phase:2/3 .* sgd_docs:2 ", log, re.M) and re.search(r"^phased_ttt_exact val_loss:", log, re.M)
    check = re.search(r"^legality_check:pass .* mode:phased_ttt .*sync ok: .* after 0 of (\d+) adaptations$", log, re.M)
    assert check and int(check[1]) >= 1, "the check must reach a global SGD phase"
