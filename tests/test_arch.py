"""Record techniques: causality for each technique and each seed config, document isolation with the
BOS mask, the recurrence schedule, seed parameter counts, and a few steps of every seed config."""
import re
import subprocess
import sys

import pytest
import torch

from _util import ROOT, awake_model, read_log, run_train, tiny_args

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TINY = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=96, train_seq_len=24, rope_dims=8)
TECHNIQUES = {
    "baseline": {},
    "xsa": dict(xsa_last_n=4),
    "partial_rope_ntk": dict(rope_dims=8, rope_ntk_len=8),
    "smear_v2": dict(smear="v2"),
    "smear_v3": dict(smear="v3", gate_window=12),
    "bigram": dict(bigram_buckets=37, bigram_dim=16),
    "value_embed": dict(ve_layers="1,3", ve_dim=8),
    "skip_gates_ln_scale": dict(skip_gates=1, ln_scale=1),
    "qk_gain_split": dict(qk_gain_split=1),
    "lrelu2_ortho": dict(mlp_act="lrelu2", ortho_init=1),
    "silu2_embed_scale": dict(mlp_act="silu2", embed_scale=1),
    "gate_dense": dict(attn_gate="dense"),
    "gate_sparse": dict(attn_gate="sparse", attn_gate_scale=0.5),
    "gate_out2": dict(attn_gate="out2"),
    "cores_526": dict(num_layers=5, num_cores=3),
    "loop_1550": dict(num_layers=6, loop_start=1, loop_end=2, num_loops=2, loop_ln_scale=1),
    "parallel_gptj": dict(parallel_start=2, parallel_mode="gptj"),
    "parallel_two_lane": dict(parallel_start=2, parallel_mode="two_lane", skip_gates=1),
    "parallel_lanes": dict(parallel_start=3, parallel_mode="lanes"),
    "doc_attention": dict(doc_attention=1),
    "untied_head": dict(tie_embeddings=0),
}
SEEDS = ["baseline", "pr473", "pr526", "pr573", "pr1550", "pr1812"]
SEED_PARAMS = {"baseline": 17_059_912, "pr473": 27_124_828, "pr526": 24_634_452, "pr573": 26_993_756,
               "pr1550": 36_311_132, "pr1812": 35_946_192}


def build(over: dict, path=None, looping=True):
    cfg, _ = tg.load_config(path, {k: str(v) for k, v in over.items()}, {})
    model = awake_model(cfg)
    model.looping = looping and cfg.num_loops > 0
    return cfg, model.eval()


def shrunk(seed: str) -> dict:
    """A seed config's structure (layers, loops, techniques) at tiny width."""
    cfg, _ = tg.load_config(str(ROOT / f"configs/{seed}.toml"), {}, {})
    over = dict(num_layers=cfg.num_layers, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=96,
                rope_dims=8 if cfg.rope_dims else 0, train_seq_len=24)
    if cfg.bigram_buckets:
        over.update(bigram_buckets=53, bigram_dim=16)
    if cfg.ve_layers:
        over["ve_dim"] = 8
    return over


def assert_causal(model, vocab: int, T: int = 24, bos: int = 1):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(2, vocab, (2, T), generator=g)
    x[:, 0], x[:, 9] = bos, bos  # two documents per row
    with torch.no_grad():
        a = model(x)
        for p in (5, 12, T - 2):
            y = x.clone()
            y[:, p + 1 :] = torch.randint(2, vocab, (2, T - p - 1), generator=g)
            b = model(y)
            assert torch.equal(a[:, : p + 1], b[:, : p + 1]), f"position <= {p} changed"
            assert not torch.equal(a[:, p + 1 :], b[:, p + 1 :])


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_technique_is_causal(name):
    cfg, model = build({**TINY, **TECHNIQUES[name]})
    assert_causal(model, cfg.vocab_size)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_seed_config_is_causal_at_tiny_size(seed):
    cfg, model = build(shrunk(seed), str(ROOT / f"configs/{seed}.toml"))
    assert_causal(model, cfg.vocab_size)


@pytest.mark.parametrize("tech", ["smear_v2", "smear_v3", "bigram"])
def test_bos_mask_isolates_documents(tech):
    """Changing the last token of document n never changes document n+1 (embedding stage, and the
    whole model with document attention); without the mask the leak is detected."""
    T, bos = 24, 1
    x = torch.randint(2, 96, (2, T), generator=torch.Generator().manual_seed(5))
    x[:, 0], x[:, 10] = bos, bos
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 94 + 2  # last token of document 1
    for mask in (True, False):
        cfg, model = build({**TINY, **TECHNIQUES[tech], "bos_mask": int(mask), "doc_attention": 1})
        with torch.no_grad():
            same_embed = torch.equal(model.embed(x)[:, 10:], model.embed(y)[:, 10:])
            same_logits = torch.equal(model(x)[:, 10:], model(y)[:, 10:])
        assert same_embed == mask and same_logits == mask, (tech, mask)


def test_bigram_hash_and_reserved_bucket():
    cfg, model = build({**TINY, "bigram_buckets": 37, "bigram_dim": 16})
    seen = {}

    def grab(mod, inp, out):
        seen["h"] = inp[0]

    model.bigram.table.register_forward_hook(grab)
    ids = torch.tensor([[1, 5, 9, 1, 7]])
    model.embed(ids)
    h = seen["h"][0].tolist()
    want = [36] + [((36313 * c) ^ (27191 * p)) % 36 for p, c in [(1, 5), (5, 9)]] + [36, ((36313 * 7) ^ (27191 * 1)) % 36]
    assert h == want  # position 0 and every BOS use the reserved "no previous token" bucket


def test_recurrence_schedules_and_sharing():
    cfg, _ = tg.load_config(str(ROOT / "configs/pr1812.toml"), {}, {})
    assert tg.layer_order(cfg, False) == list(range(11))
    assert tg.layer_order(cfg, True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    cfg5, _ = tg.load_config(str(ROOT / "configs/pr1550.toml"), {}, {})
    assert tg.layer_order(cfg5, True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    # looping reuses the same blocks: no new parameters, and every pass sends gradient to the shared core
    cfg, model = build({**TINY, "num_layers": 6, "loop_start": 1, "loop_end": 2, "num_loops": 2}, looping=False)
    n = tg.count_params(model)
    x = torch.randint(0, 96, (1, 16))
    model.train()
    model(x, x).backward()
    g_off = model.qo_bank.grad[1].clone()
    model.zero_grad()
    model.looping = True
    model(x, x).backward()
    assert tg.count_params(model) == n and not torch.allclose(model.qo_bank.grad[1], g_off)
    # PR #526 style: 5 layers over 3 cores; layer 3 reuses core 0's matrices but has its own scales
    cfg, model = build({**TINY, "num_layers": 5, "num_cores": 3})
    assert [b.core for b in model.blocks] == [0, 1, 2, 0, 1] and model.qo_bank.shape[0] == 6
    assert model.blocks[3].attn_scale is not model.blocks[0].attn_scale
    assert model.core_uses.tolist() == [2.0, 2.0, 1.0]


def test_rope_ntk_only_beyond_the_configured_length():
    cfg, model = build({**TINY, "rope_dims": 8, "rope_ntk_len": 16})
    cos16, _ = model.rope(16, "cpu")
    cos32, _ = model.rope(32, "cpu")
    plain = tg.GPT(tg.load_config(None, {k: str(v) for k, v in {**TINY, "rope_dims": 8}.items()}, {})[0])
    assert torch.equal(cos16, plain.rope(16, "cpu")[0])  # at or below the length: no rescaling
    assert not torch.allclose(cos32[:, :16], cos16)  # beyond it the base grows by (32/16)^(8/6)
    inv = (10000 * 2 ** (8 / 6)) ** (-torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(cos32[0, 5, 0], torch.cos(5 * inv))


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_param_counts(seed):
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--config", str(ROOT / f"configs/{seed}.toml"), "--dry-run"],
                       capture_output=True, text=True, check=True)
    assert p.stdout.splitlines()[0] == f"model_params:{SEED_PARAMS[seed]}"


def test_bank_views_roundtrip():
    cfg, model = build({**TINY, "num_layers": 5, "num_cores": 3})
    sd = model.state_dict()
    flat = tg.unbank(sd)
    assert flat["blocks.2.attn.c_v.weight"].shape == (32, 64) and torch.equal(flat["blocks.2.attn.c_v.weight"], sd["kv_bank"][5])
    assert "blocks.3.attn.c_q.weight" not in flat  # 3 cores: per-core names only
    back = tg.rebank(flat)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("seed", ["pr473", "pr526", "pr573", "pr1550", "pr1812"])
def test_seed_config_trains_end_to_end_at_tiny_width(seed, sample_data, tmp_path):
    """The whole trainer (warmup over both loop variants, QAT/EMA/SWA, artifact, re-load) on each seed
    config's structure at tiny width; the loop switches on mid-run."""
    over = {**shrunk(seed), "vocab_size": sample_data["vocab_size"], "iterations": 4, "warmup_steps": 1,
            "train_seq_len": 64, "quant_scheme": "int8", "compressor": "zlib", "gptq": 0, "checkpoint_every": 0,
            "max_wallclock_seconds": 0, "swa_lr_threshold": 1.1, "swa_every": 1, "qat_lr_threshold": 0.6}
    if seed == "pr1550":
        over["loop_at_step"] = 2  # pr1812 keeps its loop_at_frac=0.35: step 2 of 4 is the first at or past it
    if seed == "pr1812":  # its shuffled loader gives virtual rank r shards r, r+V, ...: the sample has one shard
        over["virtual_world_size"] = 1
    if seed == "pr573":  # and one seed calibrates GPTQ on text the model writes itself
        over.update(quant_scheme="mixed", gptq=1, gptq_calib_source="self", gptq_calib_batches=2, quant_keep_float_numel=1000)
    args = ["--config", str(ROOT / f"configs/{seed}.toml")] + tiny_args(sample_data, **over) + [f"--run_id={seed}"]
    run_train(args, tmp_path)
    log = read_log(tmp_path, seed)
    assert re.search(r"^final_(int8_zlib|mixed_zlib)_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)
    if seed == "pr573":
        assert re.search(r"^gptq_calibration:\d+ hessians source:self batches/rank:2 ", log, re.M)
        assert re.search(r"^quant_table: mlp .* gptq ", log, re.M)
    cfg, _ = tg.load_config(str(ROOT / f"configs/{seed}.toml"), {}, {})
    if cfg.num_loops:
        assert "warmup_step:1/1 looping:on" in log and re.search(r"^layer_loop:on step:2 frac:0.500 ", log, re.M)
    if cfg.qat:
        assert re.search(r"^late_qat:on step:\d+ ", log, re.M)
        # the logged roundtrip is the artifact's own score: a fresh model (QAT off) re-scores it exactly
        import quantize

        state, art_cfg, _ = quantize.read_artifact(next((tmp_path / "runs" / seed).glob("final_model.*.ptz")))
        c = tg.config_class()(**art_cfg)
        model = tg.GPT(c)
        model.load_state_dict(tg.rebank(state))
        val = tg.usable_val(tg.load_val_stream(tg.shard_files(c.data_path, "val"), c.vocab_size), c.train_seq_len)
        tgt_bytes = torch.from_numpy(tg.val_target_bytes(c, tg.load_tokenizer(c), val))
        rt = tg.Runtime(0, 1, 0, torch.device("cpu"), c.virtual_world_size)
        bpb = tg.eval_val(c, model, rt, torch.from_numpy(val.astype("int32")), tgt_bytes)[1]
        assert "roundtrip_exact val_loss:" in log and f"val_bpb:{bpb:.8f}" in log.split("roundtrip_exact")[-1]
    assert f"weights_average:{cfg.weight_average}" in log
