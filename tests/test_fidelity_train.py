"""Issue 12 training fidelity: per-rank gradient clipping, bf16 Muon, PR #1812's momentum blend and
loader, the records' CUDA storage dtypes, seed-config calibration keys. Tiny, CPU, fast."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _util import ROOT, read_log, run_train, tiny_args, train_losses
from test_optim import small_cfg, synthetic_grads

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

CPU1 = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)


def seed_cfg(name: str, **over):
    """A seed config shrunk to a CPU shape; every training key keeps the config's value."""
    small = {"model_dim": "64", "num_heads": "4", "num_kv_heads": "2", "vocab_size": "96", "rope_dims": "8", "num_layers": "3",
             "train_seq_len": "16", "loop_start": "1", "loop_end": "1", "parallel_start": "2", "ve_layers": "", "num_skips": "-1",
             "num_cores": "0"}
    small.update({k: str(v) for k, v in over.items()})
    return tg.load_config(str(ROOT / "configs" / f"{name}.toml"), small, {})[0]


# ----------------------------------------------------------------------------- item 10: clipping rule

def clipped_mean(model, step, parts, clip):
    """What the records compute: every rank clips its own gradient (torch's clip_grad_norm_), then the mean."""
    out = []
    for part in parts:
        gs = synthetic_grads(model, step, part)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        coef = min(clip / (norm.item() + 1e-6), 1.0)
        out.append([g * coef for g in gs])
    return [sum(g[i] for g in out) / len(out) for i in range(len(out[0]))]


def _clip_worker(rank, world, init, out, over):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = small_cfg(**over)
    model = tg.GPT(cfg)
    opt = tg.Optimizer(model, cfg, tg.Runtime(rank, world, 0, torch.device("cpu"), 1))
    for step in range(3):
        for p, g in zip(model.parameters(), synthetic_grads(model, step, rank)):
            p.grad = g.clone()
        opt.step(lr_mul=1.0, momentum=0.9)
        opt.zero_grad()
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo on torch 2.13 can abort while the interpreter tears down its threads


def test_local_clip_rule_is_what_each_rank_does_two_ranks(tmp_path):
    """2 gloo ranks, each with its own N(0,1) gradient (norm far above the clip of 0.5). grad_clip_rule=local:
    each rank clips its local gradient and the reduction averages the clipped gradients; 1 process
    stepping on that mean by hand (clipping off) lands on the same weights, bit for bit. The global rule
    (the norm of the mean) is a different operator: its weights differ."""
    over = {"grad_clip_norm": 0.5, "grad_clip_rule": "local", "bigram_buckets": 0, "ve_layers": ""}
    out = tmp_path / "two.pt"
    mp.spawn(_clip_worker, args=(2, f"file://{tmp_path / 'rdv'}", str(out), over), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    results = {}
    for rule in ("local", "global"):
        torch.manual_seed(0)
        cfg = small_cfg(**{**over, "grad_clip_norm": 0.0 if rule == "local" else 0.5, "grad_clip_rule": "global"})
        model = tg.GPT(cfg)
        opt = tg.Optimizer(model, cfg, CPU1)
        for step in range(3):
            grads = clipped_mean(model, step, [0, 1], 0.5) if rule == "local" else \
                [sum(gs) / 2 for gs in zip(*(synthetic_grads(model, step, r) for r in (0, 1)))]
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step(lr_mul=1.0, momentum=0.9)
            opt.zero_grad()
        results[rule] = model.state_dict()
    for k, v in results["local"].items():  # the same ops in the same order: bit-identical (measured)
        assert torch.equal(two[k], v), k
    assert (two["tok_emb.weight"] - results["global"]["tok_emb.weight"]).abs().max().item() > 1e-2  # measured 0.1


# ----------------------------------------------------------------------------- item 10: bf16 Muon (PR #473)

def test_bf16_momentum_sums_nesterov_in_bf16():
    """muon_momentum_dtype=bf16 (PR #473): the gradient is cast to bf16 before the momentum and the
    Nesterov sum, so u = g_bf16 + mu * buf_bf16 rounds in bf16; an fp32 sum rounded once differs."""
    cfg = small_cfg(muon_momentum_dtype="bf16", bigram_buckets=0, ve_layers="", muon_wd=0.0)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    opt = tg.Optimizer(model, cfg, CPU1)
    gs = [torch.randn_like(model.qo_bank) for _ in range(2)]
    buf, w = torch.zeros_like(model.qo_bank, dtype=torch.bfloat16), model.qo_bank.detach().clone()
    for g in gs:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        model.qo_bank.grad = g.clone()
        opt.step(lr_mul=1.0, momentum=0.95)
        gb = g.bfloat16()
        buf = buf * 0.95 + gb  # bf16 arithmetic, as the records
        u = tg.orthogonalize(gb.add(buf, alpha=0.95), cfg.muon_backend_steps)  # g.add(buf, alpha=mu) as the records
        wrong = tg.orthogonalize(g.add(buf.float(), alpha=0.95), cfg.muon_backend_steps)  # the fp32 Nesterov sum
        w = w - cfg.matrix_lr * u.float()
    assert not torch.equal(u, wrong)
    assert torch.equal(opt.mom["qo_bank"], buf)
    assert torch.allclose(model.qo_bank, w, atol=1e-7, rtol=0)


def test_seed_configs_use_the_records_clip_and_momentum_dtype():
    """PR #473 and PR #1550 are banked Parallel Muon (per-rank clipping, bf16 momentum); PR #1812
    descends from the DDP 04-09 record (global clip of the averaged gradient, fp32 momentum)."""
    got = {n: (seed_cfg(n).grad_clip_rule, seed_cfg(n).muon_momentum_dtype) for n in ("pr473", "pr1550", "pr1812")}
    assert got == {"pr473": ("local", "bf16"), "pr1550": ("local", "bf16"), "pr1812": ("global", "fp32")}


# ----------------------------------------------------------------------------- item 11: momentum blend

def test_pr1812_blends_momentum_toward_092_in_the_warmdown():
    """mu = b*mu + (1-b)*0.92, b = max(lr_mul, 0.25): unchanged at lr_mul 1, ends at 0.9375 (not 0.99)."""
    cfg = seed_cfg("pr1812", max_wallclock_seconds=100, gptq_reserve_seconds=0)
    assert cfg.muon_momentum_warmdown == 0.92
    late = 90_000  # past the 22% warmup: mu = 0.99 before the blend
    assert tg.muon_momentum(cfg, 10, late, 1.0) == pytest.approx(0.99)
    assert tg.muon_momentum(cfg, 10, late, 0.5) == pytest.approx(0.5 * 0.99 + 0.5 * 0.92)
    assert tg.muon_momentum(cfg, 10, late, 0.1) == pytest.approx(0.25 * 0.99 + 0.75 * 0.92)  # floor b = 0.25
    assert tg.muon_momentum(cfg, 10, late, 0.0) == pytest.approx(0.9375)
    plain = seed_cfg("pr473")
    assert tg.muon_momentum(plain, 5000, 0.0, 0.1) == pytest.approx(0.99)  # off elsewhere


# ----------------------------------------------------------------------------- item 11: PR #1812's loader

import data_loader as dl  # noqa: E402
import numpy as np  # noqa: E402

T = 16
SIZES = [300, 517, 410, 263, 388, 601, 350, 290, 444, 333, 275, 480, 390, 305, 320, 299]  # 16 shards, 2 per virtual rank


def write_shards(root):
    """Shard i holds tokens 2000*i + position: every row names its shard and start offset."""
    import prepare

    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(SIZES):
        prepare.write_shard(root / f"fineweb_train_{i:06d}.bin", np.arange(n, dtype=np.int64) + 2000 * i)
    return sorted(root.glob("fineweb_train_*.bin"))


def where(row):
    shard, pos = divmod(int(row[0]), 2000)
    assert np.array_equal(np.asarray(row), np.arange(T + 1) + int(row[0]))  # T+1 contiguous tokens of one shard
    return shard, pos


def loader(files, rank, world, accum, n_local=6):
    rt = tg.Runtime(rank, world, 0, torch.device("cpu"), accum)
    return dl.ShuffledSequenceLoader(files, rt, 65536, T), n_local * world * accum * T


def rows(ld, global_tokens):
    x, y = ld.next_batch(global_tokens, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x, y[:, -1:]], 1).numpy()


def test_shuffled_loader_follows_pr1812_rules(tmp_path):
    """Rank 3 of 8 reads shards 3 and 11 only; a PCG64 seeded with the rank; rows start at phase + i*T
    with phase one of the 8 evenly spaced offsets in [0, min(T-1, n-T-1)]; the first batch is split by
    largest remainder in proportion to the rows left; every row is used once before any shard resets,
    and each reset moves to the shard's next phase."""
    files = write_shards(tmp_path / "d")
    ld, gt = loader(files, 3, 8, 1)
    sh = ld.stream.ranks[0]
    assert [f.name for f in sh.files] == [files[3].name, files[11].name]
    rng = np.random.Generator(np.random.PCG64(3))
    cycle = [rng.permutation(8), rng.permutation(8)]
    want_phase = [int(np.linspace(0, min(T - 1, n - T - 1), 8).astype(np.int64)[c[0]]) for n, c in zip((263, 480), cycle)]
    n_rows = [(n - 1 - p) // T for n, p in zip((263, 480), want_phase)]
    first = [where(r) for r in rows(ld, gt)]
    count = [sum(s == k for s, _ in first) for k in (3, 11)]
    base, rem = zip(*(divmod(6 * n, sum(n_rows)) for n in n_rows))  # largest remainder, by hand
    assert count == [b + (r > rem[1 - k] or (r == rem[1 - k] and k == 0)) for k, (b, r) in enumerate(zip(base, rem))]
    seen, phases = {3: [], 11: []}, {3: set(), 11: set()}
    for s, p in first:
        seen[s].append(p)
    for _ in range(sum(n_rows) // 6 - 1):  # all whole batches before the rows run out
        for s, p in (where(r) for r in rows(ld, gt)):
            seen[s].append(p)
    for s, ph, n in zip((3, 11), want_phase, n_rows):
        assert set(seen[s]) <= {ph + i * T for i in range(n)} and len(set(seen[s])) == len(seen[s]), s  # each row once
        assert seen[s] != sorted(seen[s])  # in a shuffled order
    assert sum(map(len, seen.values())) == sum(n_rows) - sum(n_rows) % 6
    for _ in range(3):  # past the end: all shards reset to their next phase
        for s, p in (where(r) for r in rows(ld, gt)):
            phases[s].add(p % T)
    nxt = [int(np.linspace(0, min(T - 1, n - T - 1), 8).astype(np.int64)[c[1]]) for n, c in zip((263, 480), cycle)]
    assert phases == {3: {nxt[0] % T}, 11: {nxt[1] % T}}
    other_seed = loader(files, 3, 8, 1)[0]  # the run seed never enters: the same rank gives the same data
    assert np.array_equal(rows(other_seed, gt), rows(loader(files, 3, 8, 1)[0], gt))


def test_shuffled_loader_one_gpu_sees_the_eight_ranks_rows_and_resumes(tmp_path):
    """virtual_world_size 8 on 1 process (8 micro-steps) = 8 ranks' loaders; on 2 ranks x 4 micro-steps,
    rank r's micro-step j = virtual rank 4r+j. A state saved mid-run (through torch.save, weights_only)
    continues with exactly the rows the uninterrupted loader hands out, prefetch included."""
    files = write_shards(tmp_path / "d")
    eight = [loader(files, r, 8, 1)[0] for r in range(8)]
    one, gt = loader(files, 0, 1, 8)
    two = [loader(files, r, 2, 4)[0] for r in range(2)]
    later = []
    for step in range(12):  # several resets of the smaller ranks
        want = [rows(ld, gt) for ld in eight]
        assert all(np.array_equal(rows(one, gt), w) for w in want), step
        assert all(np.array_equal(rows(two[v // 4], gt), want[v]) for v in range(8)), step
        if step == 6:
            path = tmp_path / "s.pt"
            torch.save({"loader": one.state()}, path)
        later += want if step > 6 else []
    back = loader(files, 0, 1, 8)[0]
    back.load_state(torch.load(path, weights_only=True)["loader"])
    assert all(np.array_equal(rows(back, gt), w) for w in later)


def test_shuffled_loader_key_and_pr1812_config(tmp_path):
    files = write_shards(tmp_path / "d")
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 8)
    cfg = small_cfg(train_loader="shuffled", train_seq_len=T, vocab_size=65536)
    assert isinstance(dl.make_loader(cfg, files, rt), dl.ShuffledSequenceLoader)
    assert type(dl.make_loader(small_cfg(vocab_size=65536), files, rt)) is dl.DistributedTokenLoader
    assert seed_cfg("pr1812").train_loader == "shuffled" and seed_cfg("pr473").train_loader == "sequential"
    with pytest.raises(dl.DataError, match="no shard of 17"):  # 16 shards cannot feed 32 virtual ranks
        loader(files, 0, 1, 32)
    with pytest.raises(dl.DataError, match="fewer than a batch"):
        rows(*loader(files, 0, 8, 1, n_local=100))


def test_shuffled_loader_run_resumes_from_its_checkpoint(sample_data, tmp_path):
    """train_loader=shuffled end to end: the loader state rides in the checkpoint, so a resumed run
    trains on the rows the uninterrupted run saw (same losses)."""
    args = tiny_args(sample_data, iterations=6, checkpoint_every=3, keep_checkpoints=5, train_loader="shuffled",
                     virtual_world_size=1)  # the sample has one train shard: one (virtual) rank
    run_train(args + ["--run_id=ref"], tmp_path)
    run_train(args + ["--run_id=back", "--resume", str(tmp_path / "runs/ref/ckpt_step000003.pt")], tmp_path)
    seq = run_train(tiny_args(sample_data, iterations=6, train_loader="sequential", virtual_world_size=1) + ["--run_id=seq"], tmp_path)
    ref, back = train_losses(read_log(tmp_path, "ref")), train_losses(read_log(tmp_path, "back"))
    assert sorted(back) == [4, 5, 6] and max(abs(back[k] - ref[k]) for k in back) < 1e-6
    assert seq.returncode == 0 and train_losses(read_log(tmp_path, "seq"))[1] != ref[1]  # another data order


# ----------------------------------------------------------------------------- item 7: official CUDA dtypes

def test_official_storage_dtypes():
    """storage_dtypes=official: the records' model.bfloat16() then banks, linears, ndim<2 and control
    tensors back to fp32, so the embedding tables (and their Adam state) are bf16 casts of the fp32 init,
    everything else fp32; the RoPE table comes from the bf16 inv_freq buffer (positions in its dtype),
    except an NTK-rescaled table, which the records rebuild in fp32. fp32 stays the default."""
    over = dict(bigram_buckets=32, ve_layers="2", smear="v3", attn_gate="sparse", skip_gates=1)
    torch.manual_seed(0)
    ref = tg.GPT(small_cfg(**over))
    cfg = small_cfg(storage_dtypes="official", **over)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    tables = {"tok_emb.weight", "bigram.table.weight", "ve.table.weight"}
    for n, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if n in tables else torch.float32), n
        want = ref.get_parameter(n).detach()
        assert torch.equal(p.detach(), want.to(p.dtype)), n
    assert all(p.dtype == torch.float32 for p in ref.parameters()) and tg.count_params(model) == tg.count_params(ref)
    opt = tg.Optimizer(model, cfg, CPU1)
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    opt.step(1.0, 0.9)
    assert opt.adams[0].state[model.tok_emb.weight]["exp_avg"].dtype == torch.bfloat16
    cos, _ = model.rope(64, "cpu")
    inv = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)  # head dim 32, all dims rotate
    assert torch.equal(cos[0, :, 0], torch.outer(torch.arange(64, dtype=torch.bfloat16), inv.bfloat16()).cos())
    assert not torch.equal(cos.float(), ref.rope(64, "cpu")[0])
    ntk = tg.GPT(small_cfg(storage_dtypes="official", rope_ntk_len=32))
    assert ntk.rope(64, "cpu")[0].dtype == torch.float32 and ntk.rope(16, "cpu")[0].dtype == torch.bfloat16


def test_seed_configs_set_official_storage_dtypes():
    assert all(seed_cfg(n).storage_dtypes == "official" for n in ("pr473", "pr526", "pr573", "pr1550", "pr1812"))
    assert tg.load_config(str(ROOT / "configs/baseline.toml"), {}, {})[0].storage_dtypes == "fp32"  # baseline.toml = defaults


# ----------------------------------------------------------------------------- item 8: calibration keys

def test_seed_config_calibration_and_packing_keys():
    c = seed_cfg("pr1812")
    assert (c.gptq_calib_batches, c.gptq_calib_source, c.byte_shuffle, c.code_packed) == (64, "train", True, True)
    c = seed_cfg("pr1550", train_seq_len=2048)
    assert (c.gptq_calib_source, c.gptq_calib_seqs, c.train_seq_len) == ("self", 32, 2048)


def test_self_calibration_generates_the_configured_number_of_sequences(sample_data, tmp_path):
    """gptq_calib_seqs: PR #1550 calibrates on 32 generated sequences in all, not on whole local batches."""
    args = tiny_args(sample_data, iterations=2, quant_scheme="mixed", gptq=1, gptq_calib_source="self", gptq_calib_seqs=3,
                     quant_keep_float_numel=1000, virtual_world_size=1)
    run_train(args + ["--run_id=cal"], tmp_path)
    assert "hessians source:self batches/rank:1 seqs/rank:3 " in read_log(tmp_path, "cal")
