"""ttt_eval.py: exactly-once sliding windows, illegal modes labelled and gated (the legality check: test_legality.py),
2-rank TTT equals 1-rank, frozen banked blocks stay put, and the CLI on a real artifact."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from _util import ROOT, awake_model, run_train

sys.path.insert(0, str(ROOT))
import quantize  # noqa: E402
import train_gpt as tg  # noqa: E402
import ttt_eval as te  # noqa: E402

TINY = dict(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, vocab_size=512, train_seq_len=64, eval_stride=16,
            ttt_chunk_tokens=256, ttt_epochs=1, ttt_lr=0.01, autocast_dtype="fp32", eval_batch_seqs=8)


@pytest.mark.parametrize("n,L,stride", [(100, 16, 4), (101, 16, 4), (17, 16, 4), (10, 16, 4), (1000, 64, 64), (999, 64, 1),
                                        (2, 8, 8), (513, 128, 48)])
def test_windows_score_every_target_exactly_once(n, L, stride):
    seen = np.zeros(n, dtype=int)
    for ws, wlen, s in te.windows(n, L, stride):
        assert 1 <= wlen <= L and ws + wlen <= n - 1
        seen[ws + 1 + s : ws + wlen + 1] += 1
        if ws > 0:
            assert s == L - stride  # every scored target past the first window has L - stride of context
    assert seen[0] == 0 and (seen[1:] == 1).all()


def tiny(sample_data, **over):
    cfg, _ = tg.load_config(None, {k: str(v) for k, v in {**TINY, "tokenizer_path": sample_data["tokenizer_path"],
                                                              "data_path": sample_data["data_path"], **over}.items()}, {})
    return cfg, awake_model(cfg)


def val_tokens(sample_data, n=None):
    t = tg.load_val_stream(tg.shard_files(sample_data["data_path"], "val"), 512)
    return torch.from_numpy(t[:n].astype(np.int32))


def tbytes(sample_data):
    """Bytes of every val target (the LUT rule: the sample data has no CaseOps sidecar)."""
    import sentencepiece as spm

    cfg = tg.config_class()(data_path=sample_data["data_path"], tokenizer_path=sample_data["tokenizer_path"], vocab_size=512)
    sp = spm.SentencePieceProcessor(model_file=sample_data["tokenizer_path"])
    return torch.from_numpy(tg.val_target_bytes(cfg, sp, val_tokens(sample_data).numpy()))


CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), 1)


def test_stride_equal_to_window_is_the_non_overlapping_eval(sample_data):
    cfg, model = tiny(sample_data, eval_mode="sliding", eval_stride=64)
    tokens = val_tokens(sample_data, 64 * 20 + 1)
    L = tbytes(sample_data)
    got = te.run_mode(cfg, model, model, tokens, L, CPU).result()
    want = tg.eval_val(cfg, model, tg.Runtime(0, 1, 0, torch.device("cpu"), 1), tokens, L)
    assert got == pytest.approx(want, rel=1e-12)


def test_legal_ttt_changes_the_model_and_helps(sample_data):
    cfg, model = tiny(sample_data, eval_mode="legal_ttt", ttt_epochs=2, ttt_lr=0.05)
    tokens, L = val_tokens(sample_data, 4097), tbytes(sample_data)
    base = te.run_mode(tg.config_class()(**{**vars(cfg), "eval_mode": "sliding"}), model, model, tokens, L, CPU).result()
    start = model.qo_bank.detach().clone()
    adapted = te.run_mode(cfg, model, model, tokens, L, CPU).result()
    assert not torch.equal(start, model.qo_bank) and adapted[1] < base[1]


def test_freezing_blocks_keeps_their_banked_weights(sample_data):
    cfg, model = tiny(sample_data, num_layers=4, eval_mode="legal_ttt", ttt_freeze_blocks=2, ttt_optimizer="adamw", ttt_wd=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    te.run_mode(cfg, model, model, val_tokens(sample_data, 2049), tbytes(sample_data), CPU)
    U = model.n_cores
    for name, rows in (("qo_bank", (0, 1, U, U + 1)), ("kv_bank", (0, 1, U, U + 1)), ("mlp_up_bank", (0, 1)), ("mlp_down_bank", (0, 1))):
        w = model.state_dict()[name]
        assert all(torch.equal(w[j], before[name][j]) for j in rows), name
        assert not torch.equal(w[2], before[name][2])  # block 2's core did adapt
    assert torch.equal(model.blocks[1].attn_scale, before["blocks.1.attn_scale"])
    assert not torch.equal(model.blocks[3].attn_scale, before["blocks.3.attn_scale"])


@pytest.fixture(scope="module")
def artifact(sample_data, tmp_path_factory):
    """A real tiny artifact from the trainer (2 layers, 8 steps)."""
    d = tmp_path_factory.mktemp("art")
    args = [f"--{k}={v}" for k, v in {**TINY, "data_path": sample_data["data_path"], "tokenizer_path": sample_data["tokenizer_path"],
                                       "iterations": 8, "warmup_steps": 1, "train_batch_tokens": 1024, "virtual_world_size": 2,
                                       "max_wallclock_seconds": 0, "val_loss_every": 0, "run_id": "art"}.items()]
    run_train(args, d)
    return d, d / "runs/art/final_model.int8.ptz"


def run_eval(cwd, art, *extra, nproc=1, check=True):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(launcher + [str(ROOT / "ttt_eval.py"), "--artifact", str(art), *extra], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-2000:] + p.stderr[-2000:])
    return p


def exact(log: str, name: str) -> float:
    return float(re.search(rf"^{name}_exact val_loss:[\d.]+ val_bpb:([\d.]+)$", log, re.M)[1])


def test_cli_sliding_and_legal_ttt_append_to_the_training_log(artifact):
    cwd, art = artifact
    run_eval(cwd, art, "--eval_mode=legal_ttt", "--ttt_chunk_tokens=2048", "--eval_stride=32")
    log = (cwd / "logs/art.txt").read_text()
    assert "final_int8_zlib_roundtrip_exact" in log  # the same file as training
    assert re.search(r"^eval_start artifact:\S+ bytes:\d+ mode:legal_ttt legality:legal block:\w+$", log, re.M)
    sliding, ttt = exact(log, "final_sliding_window"), exact(log, "legal_ttt")
    rt = float(re.search(r"^final_int8_zlib_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    assert sliding < rt and abs(ttt - sliding) < 0.2
    assert re.search(r"^eval_phases: load:[\d.]+s warmup:[\d.]+s sliding:[\d.]+s scoring:[\d.]+s training:[\d.]+s$", log, re.M)
    assert re.search(r"^eval_wallclock:[\d.]+s budget:600s verdict:ok$", log, re.M)


def test_two_ranks_score_like_one(artifact):
    """Windows and TTT sequences split across 2 gloo ranks; gradients summed across ranks, so only the
    float summation order differs from 1 process: the scores agree to 1e-6 bpb."""
    cwd, art = artifact
    vals = []
    for n in (1, 2):
        run_eval(cwd, art, "--eval_mode=legal_ttt", "--ttt_chunk_tokens=2048", "--eval_sliding_first=0", "--eval_stride=32",
                 f"--run_id=two{n}", nproc=n)
        vals.append(exact((cwd / f"logs/two{n}.txt").read_text(), "legal_ttt"))
    assert abs(vals[0] - vals[1]) < 1e-6, vals


def test_illegal_modes_are_labelled_and_gated(artifact):
    cwd, art = artifact
    p = run_eval(cwd, art, "--eval_mode=prequant_ttt", "--run_id=pq", check=False)
    assert p.returncode == 2 and "--allow-illegal" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_eval(cwd, art, "--eval_mode=multipass_min", "--record_mode=1", "--run_id=mp", check=False)
    assert p.returncode == 2 and "record_mode refuses it" in p.stderr
    run_eval(cwd, art, "--eval_mode=multipass_min", "--ttt_chunk_tokens=4096", "--eval_sliding_first=0", "--eval_stride=64",
             "--ttt_passes=2", "--run_id=mp2")
    log = (cwd / "logs/mp2.txt").read_text()
    assert "legality:illegal-selection" in log and "eval_legality:illegal-selection reason:" in log and "multipass_min_exact" in log
    p = run_eval(cwd, art, "--eval_mode=multipass_min", "--check-legality", "--ttt_chunk_tokens=128", "--run_id=mp3", check=False)
    assert p.returncode == 2 and "fails the legality check" in p.stderr
    run_eval(cwd, art, "--eval_mode=legal_ttt", "--check-legality", "--ttt_chunk_tokens=128", "--run_id=ok3")
    log = (cwd / "logs/ok3.txt").read_text()
    key = re.search(r"^eval_key:(\w{12})$", log, re.M)[1]  # the check names the config it vouches for
    assert re.search(rf"^legality_check:pass key:{key} mode:legal_ttt ranks:1 prefix:\d+/\d+ runs:6 .*\| C4 ok: .*\| sync ok: ", log, re.M)


def test_model_keys_come_from_the_artifact(artifact, tmp_path):
    _, art = artifact
    _, art_cfg, _ = quantize.read_artifact(art)
    cfg, notes = te.resolve_config(art_cfg, None, {"num_layers": "5", "eval_stride": "32"})
    assert cfg.num_layers == 2 and cfg.eval_stride == 32 and any("num_layers=5 ignored" in n for n in notes)
