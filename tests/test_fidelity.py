"""Seed fidelity (issue 12): each seed config computes what its record ran. XSA per weight core, the
U-Net skip at the lane split, RoPE frequencies and NTK base, the `.proj` init rule, PR #526's
optimizer settings and shared-core gradient mean, and the seeds' trimmed eval stream."""
import math
import sys

import numpy as np
import pytest
import torch

from _util import ROOT, awake_model

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
import ttt_eval as te  # noqa: E402

TINY = dict(model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=96, train_seq_len=24, rope_dims=8)


def cfg_of(path=None, **over):
    return tg.load_config(str(ROOT / f"configs/{path}.toml") if path else None, {k: str(v) for k, v in over.items()}, {})[0]


def seed_cfg(seed: str, **over):
    """A seed config's structure at tiny width (its layers, cores, loops and techniques)."""
    full = cfg_of(seed)
    small = dict(model_dim=64, num_heads=2, num_kv_heads=1, vocab_size=96, train_seq_len=24)
    if full.bigram_buckets:
        small.update(bigram_buckets=53, bigram_dim=16)
    if full.ve_layers:
        small["ve_dim"] = 8
    return cfg_of(seed, **{**small, **over})


# -- 1. XSA follows the weight core --------------------------------------------------------------


def test_pr526_xsa_on_the_last_cores():
    """PR #526: 11 layers over 10 cores, XSA on the last 4 cores, so logical layers 6..9 (10 reuses core 0)."""
    model = tg.GPT(seed_cfg("pr526"))
    assert [b.i for b in model.blocks if b.xsa] == [6, 7, 8, 9]


def test_xsa_without_shared_cores_is_the_last_layers():
    for seed, want in (("pr473", [7, 8, 9, 10]), ("pr573", [7, 8, 9, 10]), ("pr1812", list(range(11)))):
        assert [b.i for b in tg.GPT(seed_cfg(seed)).blocks if b.xsa] == want, seed
    model = tg.GPT(cfg_of(**TINY, num_layers=5, num_cores=3, xsa_last_n=1))
    assert [b.i for b in model.blocks if b.xsa] == [2]  # core 2 only; layers 3, 4 reuse cores 0, 1


# -- 2. U-Net skip at the lane split --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lanes", "two_lane"])
@pytest.mark.parametrize("lane_skip", ["lane0", "stream"])
def test_skip_at_the_lane_split_by_hand(monkeypatch, mode, lane_skip):
    """4 layers, lanes from layer 2. Layer 2 takes skip 0 (layer 1's output), layer 3 skip 1 (layer 0's).
    'stream': the skip joins the single stream, then both lanes copy it (PR #1550); 'lane0': the
    lanes split first and only lane 0 gets it (#1855). Later skips always go to lane 0."""
    cfg = cfg_of(**TINY, num_layers=4, parallel_start=2, parallel_mode=mode, lane_skip=lane_skip)
    model = awake_model(cfg).eval()
    outs, lane_in, lane_out = {}, {}, {}
    fwd, lanes = tg.Block.forward, tg.Block.lanes

    def rec_fwd(self, g, x, x0, ctx):
        outs[self.i] = fwd(self, g, x, x0, ctx)
        return outs[self.i]

    def rec_lanes(self, g, l0, l1, x0, ctx):
        lane_in[self.i] = (l0, l1)
        lane_out[self.i] = lanes(self, g, l0, l1, x0, ctx)
        return lane_out[self.i]

    monkeypatch.setattr(tg.Block, "forward", rec_fwd)
    monkeypatch.setattr(tg.Block, "lanes", rec_lanes)
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 12)))
    w = model.skip_weights.detach()
    joined = outs[1] + w[0] * outs[1]
    assert set(lane_in) == {2, 3} and set(outs) == {0, 1}
    torch.testing.assert_close(lane_in[2][0], joined, rtol=0, atol=0)
    torch.testing.assert_close(lane_in[2][1], joined if lane_skip == "stream" else outs[1], rtol=0, atol=0)
    torch.testing.assert_close(lane_in[3][0], lane_out[2][0] + w[1] * outs[0], rtol=0, atol=0)
    torch.testing.assert_close(lane_in[3][1], lane_out[2][1], rtol=0, atol=0)


def test_seed_configs_choose_the_lane_skip_rule():
    assert cfg_of("pr1550").lane_skip == "stream"
    assert cfg_of().lane_skip == "lane0"  # the current record's rule (sota-1855.md section 1.5)


# -- 3, 4. RoPE -----------------------------------------------------------------------------------


def records_cos(base: float, rd: int, T: int, ntk: int) -> torch.Tensor:
    """The records' Rotary: inv_freq = 1 / base^(i/d), NTK base rescaled beyond the table length."""
    if ntk and T > ntk:
        base = base * (T / ntk) ** (rd / (rd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    t = torch.arange(T, dtype=torch.float32)
    return torch.outer(t, inv_freq).cos()[None, :, None, :]


@pytest.mark.parametrize("rd,ntk,T", [(16, 0, 64), (16, 1024, 2048), (64, 0, 48), (16, 16, 40)])
def test_rope_bit_equal_to_the_records(rd, ntk, T):
    model = tg.GPT(cfg_of(**{**TINY, "num_layers": 1, "model_dim": 128, "num_heads": 2, "num_kv_heads": 1, "rope_dims": rd,
                             "rope_ntk_len": ntk}))
    assert torch.equal(model.rope(T, "cpu")[0], records_cos(10000.0, rd, T, ntk))


def test_pr1550_rope_table_built_for_1024_tokens():
    cfg = seed_cfg("pr1550", num_layers=1, num_loops=0, loop_start=-1, loop_end=-1, parallel_start=-1, ve_layers="")
    assert cfg.rope_ntk_len == 1024 and cfg.rope_dims == 16
    cos = tg.GPT(cfg).rope(2048, "cpu")[0]
    assert torch.equal(cos, records_cos(10000.0, 16, 2048, 1024))  # base ~22,082 at 2048


# -- 5. init of the side projections -------------------------------------------------------------


def svals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double())


@pytest.mark.parametrize("seed,rule", [("pr473", "ortho"), ("pr526", "ortho_scaled"), ("pr573", "ortho_scaled"), ("pr1550", "zero")])
def test_proj_init_per_seed(seed, rule):
    cfg = seed_cfg(seed)
    assert cfg.proj_init == rule
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    projs = [model.ve.proj] + ([model.bigram.proj] if cfg.bigram_buckets else [])
    for w in projs:
        if rule == "zero":
            assert not w.detach().any()
        else:  # orthogonal: every singular value equal, 1/sqrt(2 * num_layers) under the '.proj' rule
            want = 1 / math.sqrt(2 * cfg.num_layers) if rule == "ortho_scaled" else 1.0
            assert torch.allclose(svals(w), torch.full((min(w.shape),), want, dtype=torch.float64), atol=1e-5)
    # the block matrices: O and down still start at zero, Q/K/V/up orthogonal and unscaled
    assert not model.qo_bank[model.n_cores:].any() and not model.mlp_down_bank.any()
    assert torch.allclose(svals(model.qo_bank[0]), torch.ones(64, dtype=torch.float64), atol=1e-5)


# -- 6. PR #526 training ---------------------------------------------------------------------------


def test_pr526_optimizer_settings():
    cfg = seed_cfg("pr526")
    assert cfg.seed == 42 and cfg.embed_wd == 0.01 and cfg.adam_wd == 0.01
    model = tg.GPT(cfg)
    opt = tg.Optimizer(model, cfg, tg.Runtime(0, 1, 0, torch.device("cpu"), 1))
    wd = {id(p): g["weight_decay"] for o in opt.adams for g in o.param_groups for p in g["params"]}
    assert wd[id(model.tok_emb.weight)] == 0.01 and wd[id(model.bigram.table.weight)] == 0.01
    assert wd[id(model.ve.table.weight)] == 0.01 and wd[id(model.q_gain)] == 0.01


def test_shared_core_grads_are_means_for_every_core_parameter():
    """5 layers over 3 cores (uses 2, 2, 1): every per-core tensor - the four bank slices and q_gain -
    gets the mean of its layers' gradients, not their sum, before any optimizer reads it."""
    cfg = cfg_of(**TINY, num_layers=5, num_cores=3, core_grad_scale=1)
    model = tg.GPT(cfg)
    opt = tg.Optimizer(model, cfg, tg.Runtime(0, 1, 0, torch.device("cpu"), 1))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    seen = {}
    for o in opt.adams:
        step = o.step
        o.step = lambda step=step: (seen.setdefault("q_gain", model.q_gain.grad.clone()), step())
    opt.step(1.0, 0.9)
    uses = torch.tensor([2.0, 2.0, 1.0])
    assert torch.equal(seen["q_gain"], (1 / uses)[:, None, None].expand_as(model.q_gain))
    for bank, parts in ((model.qo_bank, 2), (model.kv_bank, 2), (model.mlp_up_bank, 1), (model.mlp_down_bank, 1)):
        want = (1 / uses).repeat(parts)
        assert torch.equal(bank.grad.flatten(1).mean(1), want)
    assert torch.equal(model.blocks[3].attn_scale.grad, torch.ones(64))  # per-layer scalars keep their own grads


# -- 9. the seeds' eval stream ---------------------------------------------------------------------


def test_eval_trim_scores_the_seeds_targets(tmp_path, monkeypatch):
    import prepare

    data = tmp_path / "ds"
    data.mkdir()
    rng = np.random.default_rng(0)
    prepare.write_shard(data / "fineweb_val_000000.bin", rng.integers(0, 96, 700))
    prepare.write_shard(data / "fineweb_val_000001.bin", rng.integers(0, 96, 300))
    cfg = cfg_of(**TINY, num_layers=2, data_path=data, eval_stride=8, autocast_dtype="fp32")
    monkeypatch.setattr(tg, "val_target_bytes", lambda cfg, sp, t: np.arange(t.size, dtype=np.int32))  # bytes follow their targets
    stream = tg.load_val_stream(tg.shard_files(data, "val"), 96)
    full, full_bytes = te.val_stream(cfg, None, stream)
    assert full.numel() == 1000 and full.dtype == torch.int32
    cfg.eval_trim = True
    trimmed, tbytes = te.val_stream(cfg, None, stream)
    T = cfg.train_seq_len
    assert trimmed.numel() == ((1000 - 1) // T) * T + 1 == 985 and torch.equal(trimmed, full[:985])
    assert torch.equal(tbytes, full_bytes[:985])
    # the sliding eval then scores targets 1..984 exactly once, none of the tail
    model = awake_model(cfg).eval()
    ones = torch.ones(trimmed.numel(), dtype=torch.int32)
    acc = te.run_mode(cfg, model, model, trimmed, ones, tg.Runtime(0, 1, 0, torch.device("cpu"), 1), track=True)
    assert acc.count.numel() == 985 and bool((acc.count[1:] == 1).all()) and acc.sums[1].item() == 984


@pytest.mark.parametrize("seed", ["pr473", "pr526", "pr573", "pr1550", "pr1812"])
def test_seed_configs_trim_the_eval_stream(seed):
    assert cfg_of(seed).eval_trim


# -- export grid: the records' fp16 scale --------------------------------------------------------


@pytest.mark.parametrize("clip_rule", ["max", "gptq_lite", "sdclip"])
def test_records_scale_rule_is_the_records_cast(clip_rule):
    """records: s = fp16(max(clip/r, floor)), nearest; floor 1/r (1/31 at int6: GPTQ-lite's C.3, the baseline's
    1/127 at int8), none for SDClip. cover (ours by default) rounds up to the next fp16 and floors at 2^-24."""
    import quantize as q

    g = torch.Generator().manual_seed(0)
    clip = torch.cat([torch.rand(500, generator=g) * 0.9, 1 + torch.rand(500, generator=g) * 40])  # below and above 1
    r = 31
    rec, cov = q.step(clip, r, "records", clip_rule), q.step(clip, r, "cover", clip_rule)
    floor = 2.0**-24 if clip_rule == "sdclip" else 1 / 31
    assert rec.dtype == cov.dtype == torch.float16
    assert torch.equal(rec, (clip / 31).clamp_min(floor).half())
    assert bool((cov.float() >= clip / 31).all()) and bool((cov.float() * r >= clip).all())
    assert bool((rec != cov).any())  # the two rules store different steps for the same rows
    if clip_rule != "sdclip":
        assert bool((rec[:500] == torch.tensor(1 / 31).half()).all())  # every row with clip < 1 shares the floor step


@pytest.mark.parametrize("seed", ["pr473", "pr526", "pr573", "pr1550", "pr1812", "pr1855"])
def test_seed_configs_store_the_records_scales(seed):
    assert cfg_of(seed).quant_scale_rule == "records"


def test_gptq_lite_records_int8_groups_are_the_baseline_int8_rows():
    """Spec C.3: with GPTQ-lite the int8 groups (embedding, other) take the baseline's per-row int8 (99.99984th
    percentile clip, step floored at 1/127), not five clip levels at r = 127; the int6 groups take the floored steps."""
    import quantize as q

    g = torch.Generator().manual_seed(0)
    state = {"tok_emb.weight": torch.randn(96, 256, generator=g) * 0.05, "blocks.0.mlp.fc.weight": torch.randn(128, 256, generator=g) * 0.05}
    c = {"quant_scheme": "mixed", "quant_clip": "gptq_lite", "quant_scale_rule": "records", "quant_keep_float_numel": 100}
    tensors, entries, _ = q.quantize_state_dict(state, c)
    qe, se = q.quantize_rows_int8(state["tok_emb.weight"])
    assert torch.equal(tensors["tok_emb.weight.q"], qe) and torch.equal(tensors["tok_emb.weight.scale"], se)
    assert bool((tensors["blocks.0.mlp.fc.weight.scale"] == torch.tensor(1 / 31).half()).all())  # |w| < 1: the floor
    cover, _, _ = q.quantize_state_dict(state, {**c, "quant_scale_rule": "cover"})
    assert not torch.equal(cover["tok_emb.weight.q"], qe)
