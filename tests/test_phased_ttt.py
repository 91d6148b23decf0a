"""eval_mode=phased_ttt (ttt_eval.phased_ttt): documents split at BOS, a static partition of the batches over the ranks,
one LoRA per document reset per document, lr 0 = the plain per-document score, adaptation helps, the legality self-check
passes at 1 and 2 ranks (tests/_phased_ranks.py) and fails under mutations of the real path."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from _util import ROOT, awake_model, run_train, val_world

sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402
import ttt_eval as te  # noqa: E402
from test_legality import CPU, TINY  # noqa: E402

# LoRA scale alpha/rank 1.8 as the record's; small enough to run in seconds, big enough that the legality prefix (1537
# tokens: 3 documents) holds a phase between batches, a warm LoRA carried from one batch to the next, and 16-target
# chunks that train before later ones are scored
PHASED = dict(eval_mode="phased_ttt", ttt_chunk_tokens=512, ttt_doc_batch=1, ttt_lora_rank=4, ttt_lora_alpha=7.2, ttt_lora_chunk=16,
              ttt_lora_lr=0.01, ttt_phase_docs=1, ttt_phases=1)


@pytest.fixture(scope="module")
def world(sample_data):
    """(config, model, val tokens, target bytes), built once; tests put the model back if they change it."""
    cfg, tokens, tbytes = val_world(TINY, sample_data["data_path"], sample_data["tokenizer_path"])
    return cfg, awake_model(cfg), tokens, tbytes


def run(world, monkeypatch, log=None, **over) -> te.Scores:
    """One phased_ttt eval of the 4000 val tokens (per-target NLLs kept); the model is put back after."""
    cfg0, model, tokens, tbytes = world
    cfg = dataclasses.replace(cfg0, **{**PHASED, **over})
    monkeypatch.setattr(model, "cfg", cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return te.run_mode(cfg, model, model, tokens, tbytes, CPU, log=log, track=True)
    finally:
        model.load_state_dict(start)


def test_documents_split_at_bos():
    t = torch.tensor([1, 5, 6, 1, 7, 1, 1, 8, 9])
    assert te.documents(t, 1) == [(0, 3), (3, 5), (5, 6), (6, 8)]  # each up to and including the next BOS
    assert te.documents(torch.tensor([4, 5, 1, 6]), 1) == [(0, 2), (2, 3)]  # a stream not starting with BOS
    assert te.documents(torch.tensor([1, 5, 6, 1]), 1) == [(0, 3)]  # a final BOS opens no document
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = torch.randint(0, 4, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g)
        seen = torch.zeros(t.numel(), dtype=torch.int64)
        for s, e in te.documents(t, 1):
            assert (s == 0 or t[s] == 1) and not (t[s + 1 : e] == 1).any() and (e == t.numel() - 1 or t[e] == 1)
            seen[s + 1 : e + 1] += 1
        assert seen[0] == 0 and (seen[1:] == 1).all()  # every target of the stream in exactly one document


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_assignment_is_a_reproducible_partition(world_size):
    for lo, hi in ((0, 0), (0, 1), (0, 17), (5, 6), (3, 40)):
        parts = [te.rank_batches(lo, hi, tg.Runtime(r, world_size, r, torch.device("cpu"), 1)) for r in range(world_size)]
        assert sorted(j for p in parts for j in p) == list(range(lo, hi))
        assert all(p == sorted(p) for p in parts)  # a rank scores its batches in stream order
        assert parts == [te.rank_batches(lo, hi, tg.Runtime(r, world_size, r, torch.device("cpu"), 1)) for r in range(world_size)]
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_phase_plan():
    cfg = dataclasses.replace(tg.config_class()(), ttt_phase_docs=2500, ttt_phases=3, ttt_doc_batch=64)
    assert te.phase_plan(50000, cfg) == [(14, 833), (27, 1666), (40, 2500)]  # the record's boundaries
    assert te.phase_plan(1700, cfg) == [(14, 833), (27, 1666)]  # a boundary past the last document is no phase


def test_lora_reset(world):
    cfg0, model, tokens, _ = world
    cfg = dataclasses.replace(cfg0, **PHASED)
    lora = te.DocLoRA(model, cfg, 3)
    lora.reset(100)
    one = te.DocLoRA(model, cfg, 1)
    one.reset(101)
    assert all(torch.equal(lora.A[k][1], one.A[k][0]) for k in lora.A)  # row r drawn from seed + r alone
    assert all((B == 0).all() for B in lora.B.values()) and len(lora.A) == 2 * 5 + 1  # 2 blocks x Q/K/V/O/MLP + head
    x = tokens[:33].long().repeat(3, 1)
    lora.step(lora(x[:, :-1], x[:, 1:], reduction="none").view(3, 32), torch.ones(3, 32, dtype=torch.bool), torch.arange(96))
    assert all(B.abs().sum() > 0 for B in lora.B.values()) and lora.opt.state
    A = {k: v.clone() for k, v in lora.A.items()}
    lora.reset(None)  # the warm reset of a new batch: B and AdamW state zeroed, A kept
    assert all((B == 0).all() for B in lora.B.values()) and not lora.opt.state
    assert all(torch.equal(A[k], lora.A[k]) for k in A)
    with torch.no_grad():  # B = 0: the LoRA forward is the base model's
        assert torch.equal(lora(x), model(x))
    lora.reset(100)
    assert not any(torch.equal(A[k], lora.A[k]) for k in A)


def test_lr0_equals_the_per_document_score(world, monkeypatch):
    """With both LRs 0 the phases and LoRAs change nothing: each target's NLL is the base model's on its document from
    its BOS (eval_seq_len covers the longest document), and the total is the doc-isolated sliding score."""
    _, model, tokens, tbytes = world
    acc = run(world, monkeypatch, ttt_lora_lr=0.0, ttt_lr=0.0, eval_seq_len=1024, ttt_doc_batch=2).reduce()
    ref = torch.zeros_like(acc.nll)
    with torch.no_grad():
        for s, e in te.documents(tokens, 1):
            ref[s + 1 : e + 1] = model(tokens[s:e][None].long(), tokens[s + 1 : e + 1][None].long(), reduction="none").double()
    assert (acc.count[1:] == 1).all() and acc.count[0] == 0
    assert torch.allclose(acc.nll, ref, rtol=0, atol=2e-5), float((acc.nll - ref).abs().max())
    assert abs(float(acc.sums[0]) - float(ref.sum())) < 1e-3
    sliding = run(world, monkeypatch, eval_mode="sliding", eval_seq_len=1024, eval_stride=64, eval_doc_isolated=True, doc_attention=True)
    assert acc.result()[1] == pytest.approx(sliding.result()[1], rel=1e-5)


def test_adaptation_improves_and_logs_phase_times(world, monkeypatch):
    lines = []
    base = run(world, monkeypatch, ttt_lora_lr=0.0, ttt_lr=0.0).result()[1]
    adapted = run(world, monkeypatch, log=lines.append, ttt_lora_lr=0.01).result()[1]
    assert adapted < base - 0.01, (adapted, base)
    assert re.fullmatch(r"ttt_phase:1/2 batches:0..0 of 5 score_time:[\d.]+s sgd_docs:1 sgd_time:[\d.]+s", lines[0]), lines
    assert re.fullmatch(r"ttt_phase:2/2 batches:1..4 of 5 score_time:[\d.]+s sgd_docs:0 sgd_time:0.0s", lines[1]), lines


def test_one_lora_per_document(world, monkeypatch):
    """Without warm A and phases a document's scores do not depend on the documents batched with it: each has its own LoRA,
    reset for it; with warm A they do (it carries what earlier documents taught)."""
    cold = dict(ttt_lora_warm_a=False, ttt_phase_docs=0)
    one, three = run(world, monkeypatch, **cold), run(world, monkeypatch, ttt_doc_batch=3, **cold)
    assert torch.allclose(one.nll, three.nll, rtol=0, atol=1e-4), float((one.nll - three.nll).abs().max())  # batched bmm rounding
    compact = run(world, monkeypatch, ttt_doc_batch=3, ttt_lora_rows="compact", **cold)  # finished documents' rows dropped
    assert torch.allclose(compact.nll, three.nll, rtol=0, atol=1e-4), float((compact.nll - three.nll).abs().max())
    warm = run(world, monkeypatch, ttt_phase_docs=0)
    assert torch.equal(warm.nll[1:561], one.nll[1:561]) and (warm.nll[562:] - one.nll[562:]).abs().max() > 1e-3


@pytest.fixture
def check(world, monkeypatch):
    cfg0, model, tokens, tbytes = world

    def run_check(**over) -> te.Verdict:
        cfg = dataclasses.replace(cfg0, **{**PHASED, **over})
        monkeypatch.setattr(model, "cfg", cfg)
        return te.check_legality(cfg, model, tokens, tbytes, CPU)

    return run_check


@pytest.mark.parametrize("over", [{}, dict(ttt_doc_batch=2), dict(ttt_doc_batch=4, ttt_lora_warm_a=False, ttt_lora_rows="compact")])
def test_phased_passes_the_legality_check(check, over):
    v = check(**over)
    assert v.ok, v.line
    assert re.search(r"prefix:1537/4000 .* C3 ok: \d+ TTT steps trained on \d+ targets, 0 of them", v.line), v.line
    assert re.search(r"sync ok: params differ across 1 rank\(s\) after 0 of 1 adaptations", v.line), v.line


def test_lora_step_before_scoring_fails_c3(check, monkeypatch):
    real = te.lora_chunk

    def train_first(cfg, lora, tokens, docs, c, acc, tbytes, device):  # the mutation: a step on the chunk, then its scoring
        monkeypatch.setattr(te.TAP, "scored", lambda *a: None)
        real(cfg, lora, tokens, docs, c, te.Scores(tokens.numel(), device), tbytes, device)
        monkeypatch.delattr(te.TAP, "scored")
        real(cfg, lora, tokens, docs, c, acc, tbytes, device)

    monkeypatch.setattr(te, "lora_chunk", train_first)
    v = check()
    assert "C3" in {f.split(":")[0] for f in v.failed}, v.line


def test_phase_on_unscored_documents_fails_c3(check, monkeypatch):
    real = te.global_sgd
    monkeypatch.setattr(te, "global_sgd", lambda cfg, model, tokens, hi, rt: real(cfg, model, tokens, hi + 600, rt))
    v = check()
    assert "C3" in {f.split(":")[0] for f in v.failed}, v.line


def test_lora_drawn_per_batch_fails_c1(check, monkeypatch):
    """The mutation (a bug this module had): A drawn for the whole batch from one seed, so a document's A depends on how
    many documents share its batch, which depends on where later BOS tokens are."""
    def reset(self, seed):
        with torch.no_grad():
            for B in self.B.values():
                B.zero_()
            g = torch.Generator().manual_seed(seed)
            for A in self.A.values():
                A.copy_(torch.rand(A.shape, generator=g) * 2 - 1)
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.ttt_lora_lr)

    monkeypatch.setattr(te.DocLoRA, "reset", reset)
    v = check(ttt_doc_batch=4, ttt_lora_warm_a=False, ttt_lora_rows="compact")  # fixed rows would hide it: 4 rows in any case
    assert "C1" in {f.split(":")[0] for f in v.failed}, v.line


def test_two_ranks(sample_data, world, monkeypatch, tmp_path):
    """tests/_phased_ranks.py under torchrun (2 gloo ranks): the check passes, fails without the phase's gradient
    all-reduce, and without warm A the 2-rank score equals this 1-rank one (the assignment moves no document's LoRA)."""
    out = tmp_path / "verdicts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "_phased_ranks.py"),
           sample_data["data_path"], sample_data["tokenizer_path"], str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["phased"]["ok"] and "ranks:2" in got["phased"]["line"], got["phased"]["line"]
    assert got["no_allreduce"]["failed"] == ["sync"], got["no_allreduce"]["line"]
    one = run(world, monkeypatch, ttt_lora_warm_a=False, ttt_doc_batch=2).reduce().result()
    assert got["cold_bpb"] == pytest.approx(one[1], rel=1e-6, abs=0)


def test_phase_boundaries_from_the_document_count_fail_c1(check, monkeypatch):
    """The mutation (a bug this module had): boundaries at min(ttt_phase_docs, documents)*k/phases, so where a phase
    pauses depends on how many BOS tokens follow."""
    real = te.phase_plan
    monkeypatch.setattr(te, "phase_plan", lambda n, cfg: real(n, dataclasses.replace(cfg, ttt_phase_docs=min(cfg.ttt_phase_docs, n))))
    v = check(ttt_phase_docs=100, ttt_phases=2)
    assert "C1" in {f.split(":")[0] for f in v.failed}, v.line


def test_lora_slots_follow_the_block_visits():
    """A looped model: one adapter set per block visit (the record's 17 slots), each used in the forward, sized
    r * (in + out) per document; the head adapter reaches the logits before the softcap."""
    cfg, _ = tg.load_config(None, {k: str(v) for k, v in dict(TINY, num_layers=3, num_loops=2, loop_start=1, loop_end=1).items()}, {})
    cfg = dataclasses.replace(cfg, **PHASED)
    model = awake_model(cfg)
    model.looping = True  # layer order 0,1,1,1,2: core 1 visited three times
    lora = te.DocLoRA(model, cfg, 2)
    lora.reset(7)
    assert sorted(v for (k, v) in lora.A if k.startswith("blocks.1.attn.c_q")) == [0, 1, 2] and len(lora.A) == 5 * 5 + 1
    d, kv, r = cfg.model_dim, model.kv_bank.size(1), cfg.ttt_lora_rank
    per_visit = (d + d) + 2 * (d + kv) + (d + d) + (d + d)  # Q, K and V, O (from the attention input), MLP (dim -> dim)
    assert sum(p[0].numel() for p in lora.params) == r * (5 * per_visit + d + cfg.vocab_size)  # + the head
    x = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        for B in lora.B.values():
            B.normal_()
    lora.step(lora(x[:, :-1], x[:, 1:], reduction="none").view(2, 32), torch.ones(2, 32, dtype=torch.bool), torch.arange(64))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.params)  # every slot is on the forward path


def test_record_lora_size():
    """The record's shapes (11 layers, layers 3-5 looped twice more, dim 512, 8 heads / 4 KV heads, vocab 8192, r 80):
    17 slots and 6,963,200 LoRA parameters per document (spec 5.2: about 6.96 M)."""
    over = dict(num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, vocab_size=8192, num_loops=2, loop_start=3, loop_end=5)
    cfg, _ = tg.load_config(None, {k: str(v) for k, v in over.items()}, {})
    model = tg.GPT(cfg)
    model.looping = True
    lora = te.DocLoRA(model, cfg, 1)
    assert len(lora.A) == 17 * 5 + 1 and sum(p.numel() for p in lora.params) == 6_963_200


def test_cli_scores_and_checks_a_real_artifact(sample_data, tmp_path):
    """ttt_eval.py on a trained tiny artifact: per-phase times, the score line, the budget line counting from the
    artifact load, and --check-legality with the same flags passing."""
    keys = {**TINY, "data_path": sample_data["data_path"], "tokenizer_path": sample_data["tokenizer_path"], "iterations": 4,
            "warmup_steps": 1, "train_batch_tokens": 1024, "virtual_world_size": 1, "max_wallclock_seconds": 0, "val_loss_every": 0,
            "run_id": "art"}
    run_train([f"--{k}={v}" for k, v in keys.items()], tmp_path)
    flags = [f"--{k}={v}" for k, v in {**PHASED, "ttt_doc_batch": 4, "ttt_phase_docs": 8, "ttt_phases": 2, "ttt_chunk_tokens": 1024}.items()]
    for extra in ([], ["--check-legality"]):
        cmd = [sys.executable, str(ROOT / "ttt_eval.py"), "--artifact", "runs/art/final_model.int8.ptz", *flags, *extra]
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = (tmp_path / "logs/art.txt").read_text()
    assert re.search(r"^ttt_phase:1/3 batches:0..0 of 7 score_time:[\d.]+s sgd_docs:4 sgd_time:[\d.]+s$", log, re.M), log[-3000:]
    assert re.search(r"^ttt_phase:3/3 batches:2..6 of 7 score_time:[\d.]+s sgd_docs:0 sgd_time:0.0s$", log, re.M), log[-3000:]
    assert re.search(r"^phased_ttt_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)
    assert re.search(r"^eval_phases: load:[\d.]+s warmup:[\d.]+s sliding:[\d.]+s scoring:[\d.]+s training:[\d.]+s$", log, re.M)
    assert re.search(r"^eval_wallclock:[\d.]+s budget:600s verdict:ok$", log, re.M)
    assert re.search(r"^legality_check:pass key:\w+ mode:phased_ttt ranks:1 ", log, re.M), log[-3000:]
