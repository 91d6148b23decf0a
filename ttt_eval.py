"""ttt_eval.py: score an artifact on the whole val set - sliding windows and legal score-first TTT.

  torchrun --standalone --nproc_per_node=8 ttt_eval.py --artifact runs/ID/final_model.mixed.ptz [--config X.toml]
  python3 ttt_eval.py --artifact A --eval_mode=sliding          # one process, CPU or GPU
  python3 ttt_eval.py --artifact A --check-legality             # C1-C4 self-check on a val prefix, then exit

Reads the artifact (weights + the config it was trained with) and the val shards, never training
data. Model keys come from the artifact; eval/TTT keys from the artifact's config unless the TOML,
an UPPER_CASE env var or a --key=value flag sets them. Appends to logs/<run_id>.txt (the training
log). Modes: sliding; legal_ttt (score a chunk, then train on it: PR #461/#473/#526/#1812 style);
phased_ttt (PR #1855: per-document LoRA, score a chunk then adapt, global SGD phases on scored documents);
multipass_min (PR #573: per-token min over trajectories, illegal selection, refused in
record_mode) and prequant_ttt (PR #1550: trains on all of val before scoring, needs --allow-illegal).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import train_gpt as tg


@dataclass
class TTTConfig:
    """Eval and test-time-training knobs; train_gpt.py merges them into its one flat config namespace."""
    eval_mode: str = "sliding"  # sliding | legal_ttt | phased_ttt | multipass_min | prequant_ttt
    eval_seq_len: int = 0  # window length (0 = train_seq_len)
    eval_stride: int = 64  # scored positions per window after the first
    eval_batch_seqs: int = 32  # windows per scoring batch
    eval_doc_isolated: bool = False  # no attention across BOS inside a window
    eval_sliding_first: bool = True  # TTT modes also log the sliding score of the untouched artifact
    eval_trim: bool = False  # score only the first ((N-1)//train_seq_len)*train_seq_len+1 val tokens, as the seeds did
    eval_budget_seconds: float = 600.0  # eval wallclock budget the log's verdict checks
    ttt_chunk_tokens: int = 32768  # tokens per TTT chunk: scored, then trained on
    ttt_optimizer: str = "sgd"  # sgd | adamw
    ttt_lr: float = 0.002  # peak TTT LR (cosine over chunks)
    ttt_momentum: float = 0.9  # SGD momentum of TTT
    ttt_nesterov: bool = False  # Nesterov momentum for TTT SGD
    ttt_wd: float = 0.0  # TTT weight decay
    ttt_epochs: int = 3  # epochs over each chunk after it is scored
    ttt_batch_seqs: int = 32  # sequences per TTT step, over all ranks together
    ttt_freeze_blocks: int = 0  # the first N blocks (their scalars and their cores' bank slices) stay fixed
    ttt_min_numel: int = 0  # adapt only tensors with at least this many elements (PR #1812: 10,000)
    ttt_grad_clip: float = 1.0  # TTT grad-norm clip (0 = off)
    ttt_zloss: float = 0.0  # + z * logsumexp^2 in the TTT loss (PR #1812: 1e-5)
    ttt_passes: int = 3  # multipass_min trajectories
    ttt_doc_batch: int = 64  # phased_ttt: documents per batch, one LoRA each (record: 64)
    ttt_lora_rank: int = 80  # phased_ttt: LoRA rank on Q/K/V/O/MLP of every block visit and on the LM head (record: 80)
    ttt_lora_alpha: float = 144.0  # phased_ttt: LoRA output scale is alpha/rank (record: 144, scale 1.8)
    ttt_lora_chunk: int = 48  # phased_ttt: targets per document chunk, scored and then trained on (record: 48)
    ttt_lora_lr: float = 1e-4  # phased_ttt: LoRA AdamW LR, constant (record: 1e-4)
    ttt_lora_beta1: float = 0.0  # phased_ttt: LoRA AdamW beta1 (record: 0)
    ttt_lora_beta2: float = 0.99  # phased_ttt: LoRA AdamW beta2 (record: 0.99)
    ttt_lora_eps: float = 1e-10  # phased_ttt: LoRA AdamW eps (record: 1e-10)
    ttt_lora_wd: float = 0.5  # phased_ttt: LoRA AdamW weight decay (record: 0.5)
    ttt_lora_rows: str = "fixed"  # fixed | compact; phased_ttt: fixed steps all rows, no shape hangs on later docs (record: fixed)
    ttt_lora_warm_a: bool = True  # phased_ttt: a new batch zeroes B and keeps A from the rank's previous batch of the phase (record: on)
    ttt_phase_docs: int = 2500  # phased_ttt: the first N documents feed the global SGD phases (record: 2500; 0 = no phases)
    ttt_phases: int = 3  # phased_ttt: cumulative global SGD phases on scored docs with the legal_ttt keys (record: 3; lr 1e-3, 1 epoch)


MODES = {"sliding": "legal", "legal_ttt": "legal", "phased_ttt": "legal", "multipass_min": "illegal-selection",
         "prequant_ttt": "non-record"}
WHY = {"multipass_min": "keeps each token's minimum NLL over several trajectories after seeing it (C2, C4) and its "
       "rotated passes train on later tokens before scoring earlier ones (C1); PR #573 was closed for this",
       "prequant_ttt": "fine-tunes on every validation token before scoring it (C3); PR #1376 was closed and PR "
       "#1550 declared itself non-record for this"}
EVAL_KEYS = {f.name for f in fields(TTTConfig)} | {"data_path", "tokenizer_path", "device", "autocast_dtype", "compile",
                                                    "run_id", "record_mode", "seed"}


def resolve_config(artifact_cfg: dict, path: str | None, overrides: dict) -> tuple[tg.Config, list[str]]:
    """Model keys from the artifact (the weights define the model); eval keys from the artifact's
    config unless set explicitly; returns the config and notes on ignored model keys."""
    cli, sources = tg.load_config(path, overrides)
    values, notes = asdict(cli), []
    for k, v in artifact_cfg.items():
        if k not in values or (k in EVAL_KEYS and k in sources):
            continue
        if k in sources and values[k] != v:
            notes.append(f"{k}={values[k]!r} ignored: the artifact was trained with {v!r}")
        values[k] = v
    cfg = tg.config_class()(**values)
    tg.validate_config(cfg)
    if cfg.eval_mode not in MODES or cfg.ttt_optimizer not in ("sgd", "adamw"):
        raise ValueError(f"eval_mode must be one of {', '.join(MODES)} and ttt_optimizer sgd or adamw")
    if min(cfg.ttt_doc_batch, cfg.ttt_lora_rank, cfg.ttt_lora_chunk, cfg.ttt_phases) < 1 or cfg.ttt_phase_docs < 0:
        raise ValueError("ttt_doc_batch, ttt_lora_rank, ttt_lora_chunk and ttt_phases must be >= 1 and ttt_phase_docs >= 0")
    return cfg, notes


# -----------------------------------------------------------------------------
# Sliding windows: every target 1..N-1 of the stream scored exactly once


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first scored offset) per window. Window ws reads tokens[ws:ws+len] and scores
    its targets from offset `seq_len - stride` on (all of them in the first window), so each target
    keeps at least seq_len - stride tokens of context; windows stop once the remaining targets fit."""
    total, ctx = n_tokens - 1, seq_len - stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"eval_stride={stride} must be in 1..eval_seq_len={seq_len}")
    out = []
    for ws in range(0, total, stride):
        if ws > 0 and ws + ctx >= total:
            break
        out.append((ws, min(seq_len, total - ws), 0 if ws == 0 else ctx))
    return out


class Scores:
    """float64 sums of NLL, targets and bytes; with track=True also every target's NLL and how
    many times it was scored (the legality check's evidence)."""

    def __init__(self, n_tokens: int, device, track: bool = False):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.nll = torch.zeros(n_tokens, dtype=torch.float64, device=device) if track else None
        self.count = torch.zeros(n_tokens, dtype=torch.int32, device=device) if track else None

    def add(self, nll: Tensor, nbytes: Tensor, idx: Tensor) -> None:
        self.sums[0] += nll.double().sum()
        self.sums[1] += nll.numel()  # a Python number: no host-to-device copy per batch
        self.sums[2] += nbytes.double().sum()
        if self.nll is not None:
            self.nll.index_add_(0, idx, nll.double())
            self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))

    def reduce(self) -> "Scores":
        for t in (self.sums, self.nll, self.count):
            if t is not None:
                tg.all_reduce_(t)
        return self

    def result(self) -> tuple[float, float]:
        nll, n, nbytes = self.sums.tolist()
        return nll / n, tg.bits_per_byte(nll, nbytes)


def mine(items: list, rt: tg.Runtime) -> list:
    """This rank's contiguous share."""
    n = len(items)
    return items[n * rt.rank // rt.world_size : n * (rt.rank + 1) // rt.world_size]


@torch.no_grad()
def score(cfg, fn, tokens: Tensor, wins: list, tbytes: Tensor, acc: Scores, device) -> None:
    """Score windows under no_grad (not inference_mode: nothing made here may later poison a
    backward), batched by length; targets before each window's offset are context only.
    tbytes[p] = bytes of target p (tg.val_target_bytes, on the device)."""
    was = fn.training
    fn.eval()
    for wlen in sorted({w[1] for w in wins}, reverse=True):
        group = [w for w in wins if w[1] == wlen]
        for b in range(0, len(group), cfg.eval_batch_seqs):
            batch = group[b : b + cfg.eval_batch_seqs]
            starts = torch.tensor([w[0] for w in batch])
            pos = starts[:, None] + torch.arange(wlen + 1)
            chunk = tokens[pos].to(device, torch.int64)
            x, y = chunk[:, :-1], chunk[:, 1:]
            with tg.autocast(cfg, device):
                nll = fn(x, y, reduction="none").view(len(batch), wlen)
            keep = torch.arange(wlen, device=device)[None, :] >= torch.tensor([w[2] for w in batch], device=device)[:, None]
            idx = (starts.to(device)[:, None] + torch.arange(1, wlen + 1, device=device))[keep]
            acc.add(nll[keep], tbytes[idx], idx)
            if TAP is not None:
                TAP.scored(fn, x, y, keep, nll[keep], idx)
    fn.train(was)


# -----------------------------------------------------------------------------
# Test-time training


def trainable(model: tg.GPT, cfg) -> tuple[list, list]:
    """(params to adapt, frozen bank rows as (bank, row index)). Freezing a block with banked
    weights means its scalars AND the bank slices of its core (a name filter alone would miss
    them, as it did in the banked records)."""
    frozen_blocks = range(min(cfg.ttt_freeze_blocks, cfg.num_layers))
    frozen_params = {id(p) for i in frozen_blocks for p in model.blocks[i].parameters()}
    U = model.n_cores
    cores = sorted({model.blocks[i].core for i in frozen_blocks})
    rows = [(getattr(model, b), j + off) for j in cores for b, offs in
            (("qo_bank", (0, U)), ("kv_bank", (0, U)), ("mlp_up_bank", (0,)), ("mlp_down_bank", (0,))) for off in offs]
    params = [p for p in model.parameters() if id(p) not in frozen_params and p.numel() >= cfg.ttt_min_numel]
    return params, rows


class Adapter:
    """SGD(+momentum/Nesterov) or AdamW over the trainable params. A step's gradient is the mean over
    its ttt_batch_seqs sequences whichever rank holds them (summed across ranks, so every rank takes
    the same step at any world size); frozen bank rows are put back after each step."""

    def __init__(self, model: tg.GPT, fn, cfg, rt):
        self.model, self.fn, self.cfg, self.rt = model, fn, cfg, rt
        self.params, self.rows = trainable(model, cfg)
        if cfg.ttt_optimizer == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum, nesterov=cfg.ttt_nesterov and cfg.ttt_momentum > 0,
                                       weight_decay=cfg.ttt_wd)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=cfg.ttt_lr, weight_decay=cfg.ttt_wd)
        self.keep = [(bank, j, bank[j].detach().clone()) for bank, j in self.rows]

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        with tg.autocast(self.cfg, self.rt.device):
            if not self.cfg.ttt_zloss:  # the model's own loss call: fused_ce's kernel when on (PR #1855's global SGD used it)
                return self.fn(x, y)
            logits = self.fn(x).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss + self.cfg.ttt_zloss * torch.logsumexp(logits, -1).square().mean()

    def train(self, tokens: Tensor, lo: int, hi: int, lr: float, epochs: int) -> None:
        """Train on pairs (tokens[i], tokens[i+1]) for i in [lo, hi): sequences split across ranks."""
        T = self.cfg.eval_seq_len or self.cfg.train_seq_len
        seqs = list(range(lo, hi - T + 1, T))
        bs = self.cfg.ttt_batch_seqs
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        if TAP is not None:
            TAP.adapting()
        for _ in range(epochs if seqs else 0):
            for s in range(0, len(seqs), bs):
                step = seqs[s : s + bs]
                for p in self.params:
                    p.grad = torch.zeros_like(p)
                batch = mine(step, self.rt)
                if batch:  # a rank without sequences still joins the reduction with zero gradients
                    pos = torch.tensor(batch)[:, None] + torch.arange(T + 1)
                    chunk = tokens[pos].to(self.rt.device, torch.int64)
                    if TAP is not None:
                        TAP.trained(pos[:, 1:])
                    (self.loss(chunk[:, :-1], chunk[:, 1:]) * (len(batch) / len(step))).backward()
                self.reduce_grads([p.grad for p in self.params])
                if self.cfg.ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.cfg.ttt_grad_clip)
                self.opt.step()
                with torch.no_grad():
                    for bank, j, w in self.keep:
                        bank[j] = w
                if TAP is not None:
                    TAP.clock += 1
        self.model.zero_grad(set_to_none=True)
        if TAP is not None:
            TAP.adapted(self.model)

    def reduce_grads(self, grads: list[Tensor]) -> None:
        """Sum the gradients over the ranks in one flat all-reduce, so every rank takes the same step."""
        if self.rt.distributed:
            flat = tg.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
            torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def chunked(cfg, n_tokens: int, wins: list) -> tuple[int, list[list]]:
    """Windows grouped by the chunk holding their first scored target (targets 1..N-1, C per chunk)."""
    C = cfg.ttt_chunk_tokens
    n_chunks = math.ceil((n_tokens - 1) / C)
    groups = [[] for _ in range(n_chunks)]
    for w in wins:
        groups[(w[0] + w[2]) // C].append(w)
    return n_chunks, groups


def legal_ttt(cfg, model, fn, tokens, wins, tbytes, rt, log, track=False, rotate=0, times=None) -> Scores:
    """Score-first TTT: for each chunk, score all its windows with the current weights, then (except
    for the last chunk) train on the chunk's tokens; LR cosine over chunks. rotate > 0 starts at a
    later chunk and wraps: only the illegal multi-pass mode does that."""
    acc, adapter = Scores(tokens.numel(), rt.device, track), Adapter(model, fn, cfg, rt)
    n_chunks, groups = chunked(cfg, tokens.numel(), wins)
    C, times = cfg.ttt_chunk_tokens, times if times is not None else {}
    for k in range(n_chunks):
        c = (k + rotate) % n_chunks
        t = time.perf_counter()
        score(cfg, fn, tokens, mine(groups[c], rt), tbytes, acc, rt.device)
        times["scoring"] = times.get("scoring", 0.0) + time.perf_counter() - t
        if k == n_chunks - 1:
            break
        t = time.perf_counter()
        lr = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * k / max(n_chunks - 1, 1)))
        adapter.train(tokens, c * C, min((c + 1) * C, tokens.numel() - 1), lr, cfg.ttt_epochs)
        times["training"] = times.get("training", 0.0) + time.perf_counter() - t
        if log and (k + 1) % max(n_chunks // 20, 1) == 0:  # every rank joins the reduction
            nll, _, nbytes = tg.all_reduce_(acc.sums.clone()).tolist()
            log(f"ttt_progress chunk:{k + 1}/{n_chunks} running_bpb:{tg.bits_per_byte(nll, nbytes):.5f} elapsed:{sum(times.values()):.1f}s")
    return acc


# -----------------------------------------------------------------------------
# Phased score-first TTT (PR #1855): one LoRA per document, global SGD phases on already-scored documents


def documents(tokens: Tensor, bos: int) -> list[tuple[int, int]]:
    """(s, e) per document: tokens s..e from its BOS up to and including the next document's BOS (the last one: to the
    stream's end), so its targets are s+1..e and every target 1..N-1 belongs to exactly one document."""
    starts = [0] + [i for i in (tokens == bos).nonzero().flatten().tolist() if i > 0]
    return [(s, e) for s, e in zip(starts, starts[1:] + [tokens.numel() - 1]) if e > s]


def rank_batches(lo: int, hi: int, rt) -> list[int]:
    """This rank's batches among lo..hi-1: round-robin by index, fixed before any token is read (reproducible, no work
    queue), so a rank's warm LoRA only ever carries documents that come earlier in the stream."""
    return list(range(lo + (rt.rank - lo) % rt.world_size, hi, rt.world_size))


def phase_plan(n_docs: int, cfg) -> list[tuple[int, int]]:
    """(batches scored before the pause, documents the phase trains on) per global SGD phase: boundary k is the first
    ttt_phase_docs*k/ttt_phases documents, the pause comes once the batch holding the last of them is scored. The
    boundaries never depend on how many documents follow (that would read future BOS tokens)."""
    bounds = sorted({cfg.ttt_phase_docs * k // cfg.ttt_phases for k in range(1, cfg.ttt_phases + 1)} - {0})
    return [(math.ceil(b / cfg.ttt_doc_batch), b) for b in bounds if b <= n_docs]


class DocLoRA:
    """One LoRA per document row: weights (rows, r, in) and (rows, out, r), added as (x A^T) B^T alpha/r through
    train_gpt's DELTA hook on c_q, c_k, c_v of every block visit, on the out-projection from the attention's normed
    input, on the MLP output from the MLP's normed input, and on the logits before the softcap. A ~ U(+-1/sqrt(in))."""

    def __init__(self, model: tg.GPT, cfg, rows: int):
        self.model, self.cfg, self.rows, self.act, self.seen, self.inp = model, cfg, rows, None, {}, {}
        U, r, dev = model.n_cores, cfg.ttt_lora_rank, model.tok_emb.weight.device
        visits = collections.Counter(model.blocks[i].core for i in tg.layer_order(cfg, model.looping))
        head = model.tok_emb.weight if model.lm_head is None else model.lm_head
        shapes = {"tok_emb.weight" if model.lm_head is None else "lm_head": (*head.shape, 1)}  # name -> (out, in, visits)
        self.src = {}  # the O and MLP adapters read the input of c_q and of mlp.fc
        for c, n in visits.items():
            pre = f"blocks.{c}."
            for part, w in (("attn.c_q", model.qo_bank[c]), ("attn.c_k", model.kv_bank[c]), ("attn.c_v", model.kv_bank[U + c]),
                            ("attn.proj", model.qo_bank[U + c]), ("mlp.proj", model.mlp_down_bank[c])):
                shapes[f"{pre}{part}.weight"] = (w.size(0), cfg.model_dim, n)
            self.src |= {pre + "attn.proj.weight": pre + "attn.c_q.weight", pre + "mlp.proj.weight": pre + "mlp.fc.weight"}
        self.visits = {k: n for k, (_, _, n) in shapes.items()}
        self.A = {(k, v): torch.zeros(rows, r, i, device=dev) for k, (o, i, n) in shapes.items() for v in range(n)}
        self.B = {(k, v): torch.zeros(rows, o, r, device=dev) for k, (o, i, n) in shapes.items() for v in range(n)}
        self.params = [p.requires_grad_() for p in (*self.A.values(), *self.B.values())]
        self.scale = cfg.ttt_lora_alpha / r

    def reset(self, seed: int | None) -> None:
        """Zero every B and the AdamW state; with a seed also draw a fresh A (else A keeps what it learned), row r from
        seed + r alone, so a document's A never depends on which documents share its batch."""
        with torch.no_grad():
            for B in self.B.values():
                B.zero_()
            g = torch.Generator(self.params[0].device)
            for r in range(self.rows if seed is not None else 0):
                g.manual_seed(seed + r)
                for A in self.A.values():
                    A[r] = (torch.rand(A.shape[1:], generator=g, device=A.device) * 2 - 1) / math.sqrt(A.size(-1))
        c = self.cfg
        self.opt = torch.optim.AdamW(self.params, lr=c.ttt_lora_lr, betas=(c.ttt_lora_beta1, c.ttt_lora_beta2), eps=c.ttt_lora_eps,
                                     weight_decay=c.ttt_lora_wd)

    def delta(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """train_gpt.DELTA: y plus each row's low-rank delta for weight `name` at its current block visit."""
        self.inp[name] = x
        if name not in self.visits:
            return y
        v = self.seen.get(name, 0)
        self.seen[name] = v + 1
        A, B = self.A[name, v % self.visits[name]], self.B[name, v % self.visits[name]]
        A, B = (A, B) if self.act is None else (A[self.act], B[self.act])
        h = torch.bmm(torch.bmm(self.inp[self.src.get(name, name)], A.transpose(1, 2)), B.transpose(1, 2))
        return y + (self.scale * h).to(y.dtype)

    def __call__(self, x: Tensor, y: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """The model's forward with the LoRAs of the document rows in self.act (None: all rows)."""
        self.seen.clear()
        self.inp.clear()
        tg.DELTA = self.delta
        try:
            return self.model(x, y, reduction=reduction)
        finally:
            tg.DELTA = None

    def step(self, nll: Tensor, mask: Tensor, idx: Tensor) -> None:
        """One AdamW step on the sum over rows of each row's mean NLL over its masked targets (stream positions idx)."""
        if TAP is not None:
            TAP.trained(idx)
        loss = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
        for p, g in zip(self.params, torch.autograd.grad(loss, self.params, allow_unused=True)):
            p.grad = g
        self.opt.step()
        if TAP is not None:
            TAP.clock += 1


def lora_chunk(cfg, lora: DocLoRA, tokens: Tensor, docs: list, c: int, acc: Scores, tbytes: Tensor, device) -> None:
    """Chunk c of each document of the batch that has one: one forward with the documents' LoRAs over at most T tokens
    of the document ending at the chunk's end, the chunk's targets scored, then one AdamW step on them for the
    documents with chunks left (a document's last chunk is never trained on)."""
    L, T = cfg.ttt_lora_chunk, cfg.eval_seq_len or cfg.train_seq_len
    act = [i for i, (s, e) in enumerate(docs) if e - s > L * c]
    act = list(range(lora.rows)) if cfg.ttt_lora_rows == "fixed" else act  # fixed: the rows of finished documents stay
    W = min(T, L * (c + 1))
    seq, keep = torch.zeros(len(act), W + 1, dtype=torch.int64), torch.zeros(len(act), W, dtype=torch.bool)
    base, more = torch.zeros(len(act), dtype=torch.int64), torch.zeros(len(act), 1, dtype=torch.bool)
    for r, (s, e) in enumerate(docs[i] if i < len(docs) else (0, 0) for i in act):
        if e - s <= L * c:
            continue
        lo, hi = L * c, min(L * c + L, e - s)  # targets s+1+lo .. s+hi; right padding is harmless under causal attention
        ws = max(0, hi - T)
        seq[r, : hi - ws + 1] = tokens[s + ws : s + hi + 1]
        keep[r, lo - ws : hi - ws] = True
        base[r], more[r] = s + ws + 1, hi < e - s
    seq, keep, more = seq.to(device), keep.to(device), more.to(device)
    pos = base.to(device)[:, None] + torch.arange(W, device=device)
    lora.act = None if len(act) == lora.rows else torch.tensor(act, device=device)
    with tg.autocast(cfg, device):
        nll = lora(seq[:, :-1], seq[:, 1:], reduction="none").view(len(act), W)
    scored, idx = nll.detach()[keep], pos[keep]
    acc.add(scored, tbytes[idx], idx)
    if TAP is not None:
        with torch.no_grad():
            TAP.scored(lora, seq[:, :-1], seq[:, 1:], keep, scored, idx)
    if bool((keep & more).any()):
        lora.step(nll, keep & more, pos[keep & more])


def global_sgd(cfg, model: tg.GPT, tokens: Tensor, hi: int, rt) -> None:
    """One phase on the base model: targets 1..hi in ttt_chunk_tokens chunks, cosine LR over them (the last chunk's
    would be 0), gradients summed over the ranks by Adapter."""
    adapter, C = Adapter(model, model, cfg, rt), cfg.ttt_chunk_tokens
    n = math.ceil(hi / C)
    for k in range(n - 1):
        adapter.train(tokens, k * C, min((k + 1) * C, hi), cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * k / (n - 1))), cfg.ttt_epochs)


def phased_ttt(cfg, model: tg.GPT, tokens: Tensor, tbytes: Tensor, rt, log, track=False, times=None) -> Scores:
    """Score-first TTT with one LoRA per document, ttt_doc_batch documents per batch in stream order, chunk by chunk;
    at each phase boundary the ranks pause and the base model trains on the first documents, all scored by then. Stream
    order, not the record's longest-first: there warm A and the phases carry later documents into earlier ones' scores (C1)."""
    acc, times, dev = Scores(tokens.numel(), rt.device, track), times if times is not None else {}, rt.device
    docs = documents(tokens, cfg.bos_id)
    batches = [docs[i : i + cfg.ttt_doc_batch] for i in range(0, len(docs), cfg.ttt_doc_batch)]
    plan, lo = phase_plan(len(docs), cfg) if cfg.ttt_phase_docs else [], 0
    for k, end in enumerate([e for e, _ in plan] + [len(batches)]):
        t, lora = time.perf_counter(), None
        for j in rank_batches(lo, end, rt):
            rows = cfg.ttt_doc_batch if cfg.ttt_lora_rows == "fixed" else len(batches[j])
            warm = lora is not None and lora.rows == rows and cfg.ttt_lora_warm_a
            lora = lora if lora is not None and lora.rows == rows else DocLoRA(model, cfg, rows)
            lora.reset(None if warm else cfg.seed * 1_000_003 + j * cfg.ttt_doc_batch)  # seed + document index
            for c in range(math.ceil(max(e - s for s, e in batches[j]) / cfg.ttt_lora_chunk)):
                lora_chunk(cfg, lora, tokens, batches[j], c, acc, tbytes, dev)
        if rt.distributed:
            tg.dist.barrier()
        dt, t = time.perf_counter() - t, time.perf_counter()
        if k < len(plan):
            if TAP is not None:  # a logical clock: each phase step comes after every scoring before the pause, on any rank
                TAP.clock = int(tg.all_reduce_(torch.tensor([TAP.clock], device=dev), tg.dist.ReduceOp.MAX if rt.distributed else None))
            global_sgd(cfg, model, tokens, docs[plan[k][1] - 1][1], rt)  # documents 0..boundary-1: targets 1..e of the last
        times["scoring"], times["training"] = times.get("scoring", 0.0) + dt, times.get("training", 0.0) + time.perf_counter() - t
        if log:
            log(f"ttt_phase:{k + 1}/{len(plan) + 1} batches:{lo}..{end - 1} of {len(batches)} score_time:{dt:.1f}s "
                f"sgd_docs:{plan[k][1] if k < len(plan) else 0} sgd_time:{time.perf_counter() - t:.1f}s")
        lo = end
    return acc


def run_mode(cfg, model, fn, tokens, tbytes, rt, log=None, track=False, times=None) -> Scores:
    """One full evaluation in cfg.eval_mode; the model ends adapted (callers restore it)."""
    T = cfg.eval_seq_len or cfg.train_seq_len
    wins = windows(tokens.numel(), T, cfg.eval_stride)
    times = times if times is not None else {}
    if cfg.eval_mode == "sliding":
        acc = Scores(tokens.numel(), rt.device, track)
        t = time.perf_counter()
        score(cfg, fn, tokens, mine(wins, rt), tbytes, acc, rt.device)
        times["scoring"] = time.perf_counter() - t
        return acc.reduce()
    if cfg.eval_mode == "phased_ttt":  # eager: the LoRA rides on train_gpt's DELTA hook
        return phased_ttt(cfg, model, tokens, tbytes, rt, log, track, times).reduce()
    if cfg.eval_mode == "legal_ttt":
        return legal_ttt(cfg, model, fn, tokens, wins, tbytes, rt, log, track, times=times).reduce()
    if cfg.eval_mode == "prequant_ttt":  # illegal: adapt on all of val, re-quantize, then score
        t = time.perf_counter()
        Adapter(model, fn, cfg, rt).train(tokens, 0, tokens.numel() - 1, cfg.ttt_lr, cfg.ttt_epochs)
        requantize(model, cfg)
        times["training"] = time.perf_counter() - t
        acc = Scores(tokens.numel(), rt.device, track)
        score(cfg, fn, tokens, mine(wins, rt), tbytes, acc, rt.device)
        return acc.reduce()
    # multipass_min (illegal): pass 0 scores the artifact; later passes restart from it, rotated
    start = copy.deepcopy(model.state_dict())
    n_chunks = chunked(cfg, tokens.numel(), wins)[0]
    passes = []
    for p in range(cfg.ttt_passes):
        model.load_state_dict(start)
        if p == 0:
            acc = Scores(tokens.numel(), rt.device, True)
            score(cfg, fn, tokens, mine(wins, rt), tbytes, acc, rt.device)
        else:
            acc = legal_ttt(cfg, model, fn, tokens, wins, tbytes, rt, log, True, rotate=p * n_chunks // cfg.ttt_passes, times=times)
        passes.append(acc.reduce())
    best = Scores(tokens.numel(), rt.device, track)
    best.nll = torch.stack([a.nll for a in passes]).min(0).values  # chosen after the targets are known
    best.count = sum(a.count for a in passes)
    nbytes = passes[0].sums[2]
    best.sums = torch.stack([best.nll.sum(), passes[0].sums[1], nbytes])
    return best


def requantize(model: tg.GPT, cfg) -> None:
    import quantize

    state = tg.unbank({k: v.detach().cpu() for k, v in model.state_dict().items()})
    tensors, entries, _ = quantize.quantize_state_dict(state, asdict(cfg))
    model.load_state_dict(tg.rebank({k: v.to(model.tok_emb.weight.device) for k, v in quantize.dequantize_state_dict(tensors, entries).items()}))


# -----------------------------------------------------------------------------
# Legality self-check: a tap on the real eval path (score, Adapter.train), read over a bounded prefix

TAP = None  # the Tap of the run check_legality is making; None in every real eval
C2_TOL = 1e-4  # nats: a scored NLL against logsumexp(full logit row) - target logit


class Enough(Exception):
    """Every target a perturbed run compares is scored: the rest of that run cannot change them."""


class Tap:
    """What one run of the real eval did: each target's NLL at its first scoring, how often and when (in TTT
    steps taken) it was scored, the targets each TTT step trained on, a hash of the params after each
    adaptation, the logit rows of watched targets and (c2) the largest gap between a scored NLL and
    the full-vocabulary softmax NLL of the logits the model gives for that window."""

    def __init__(self, cfg, n: int, device, watch: list[int], c2: bool, until: int = 0):
        self.cfg, self.device, self.c2, self.clock, self.until = cfg, device, c2, 0, until
        self.nll = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = torch.zeros(n, dtype=torch.int32, device=device)
        self.first = torch.full((n,), 2**62, dtype=torch.int64, device=device)
        self.watch = torch.tensor(sorted(watch), dtype=torch.int64, device=device)
        self.rows = torch.zeros(len(watch), cfg.vocab_size, dtype=torch.float64, device=device)
        self.gap = torch.zeros(1, dtype=torch.float64, device=device)
        self.bad_rows = torch.zeros(1, dtype=torch.int64, device=device)  # logit rows not vocab_size wide or not finite
        self.trains, self.hashes = [], []

    def scored(self, fn, x: Tensor, y: Tensor, keep: Tensor, nll: Tensor, idx: Tensor) -> None:
        new = self.count[idx] == 0
        self.nll[idx[new]] = nll[new].double()
        self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        self.first.scatter_reduce_(0, idx, torch.full_like(idx, self.clock), "amin")
        hit = torch.isin(idx, self.watch) & new
        if not (self.c2 or bool(hit.any())):
            return
        with tg.autocast(self.cfg, self.device):
            logits = fn(x)[keep].double()
        if logits.size(-1) != self.cfg.vocab_size or not bool(logits.isfinite().all()):
            self.bad_rows += len(logits)
            return
        if self.c2:
            want = torch.logsumexp(logits, -1) - logits.gather(-1, y[keep][:, None]).squeeze(-1)
            self.gap = torch.maximum(self.gap, (nll.double() - want).abs().max())
        self.rows[torch.searchsorted(self.watch, idx[hit])] = logits[hit]

    def adapting(self) -> None:
        """Called by every rank before each adaptation: stops a perturbed run once targets 1..until are scored."""
        if self.until and bool((tg.all_reduce_(self.count[1 : self.until + 1].clone()) > 0).all()):
            raise Enough

    def trained(self, targets: Tensor) -> None:
        self.trains.append((self.clock, targets.reshape(-1).to(self.device)))

    def adapted(self, model) -> None:
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().reshape(-1).cpu().view(torch.uint8).numpy())
        self.hashes.append(int.from_bytes(h.digest()[:7], "big"))

    def finish(self) -> dict:
        """Reduce over the ranks: a target counts as scored when any rank scored it; a step trained
        early when a target it used was scored after it (or never)."""
        MIN, MAX = (tg.dist.ReduceOp.MIN, tg.dist.ReduceOp.MAX) if tg.dist.is_available() else (None, None)
        for t, op in ((self.nll, None), (self.count, None), (self.rows, None), (self.bad_rows, None), (self.first, MIN), (self.gap, MAX)):
            tg.all_reduce_(t, op)
        early = [t[self.first[t] > s] for s, t in self.trains]
        c3 = torch.tensor([sum(e.numel() for e in early), sum(t.numel() for _, t in self.trains)], device=self.device)
        first_early = torch.tensor([min([int(e.min()) for e in early if e.numel()] + [2**62])], device=self.device)
        h = torch.tensor(self.hashes + [0], dtype=torch.int64, device=self.device)
        lo, hi = tg.all_reduce_(h.clone(), MIN), tg.all_reduce_(h.clone(), MAX)
        early, trained = tg.all_reduce_(c3).tolist()
        return dict(nll=self.nll, count=self.count, rows=self.rows, gap=float(self.gap), bad_rows=int(self.bad_rows), steps=self.clock,
                    early=early, trained_targets=trained, first_early=int(tg.all_reduce_(first_early, MIN)),
                    adaptations=len(self.hashes), diverged=int((lo != hi).sum()))


def tapped(cfg, model, tokens: Tensor, tbytes, rt, watch: list[int], c2: bool = False, until: int = 0) -> tuple[dict, Scores | None]:
    """One run of the real eval in cfg.eval_mode with the tap on (until > 0: stopped at the first adaptation
    after targets 1..until are scored); the model is put back after."""
    global TAP
    start = copy.deepcopy(model.state_dict())
    TAP = Tap(cfg, tokens.numel(), rt.device, watch, c2, until)
    try:
        try:
            acc = run_mode(cfg, model, model, tokens, tbytes, rt, track=True)
        except Enough:
            acc = None
        return TAP.finish(), acc
    finally:
        TAP = None
        model.load_state_dict(start)


def changed_from(tokens: Tensor, lo: int, hi: int, vocab: int) -> Tensor:
    out, g = tokens.clone(), torch.Generator().manual_seed(1234 + lo)
    out[lo:hi] = (tokens[lo:hi] + torch.randint(1, vocab, (hi - lo,), generator=g, dtype=torch.int32)) % vocab
    return out


def probe_positions(n: int, T: int, S: int, C: int) -> list[int]:
    """Perturbation points p (tokens after p change): a chunk boundary -1 and +1, mid-chunk, mid-window and
    near the end, each moved off multiples of the stride, window and chunk: at an aligned p every window
    that scores a target <= p ends its input before p, which hides a non-causal model."""
    c = C if 2 * C < n else max(n // 3, 2)
    out = set()
    for p in (c - 1, c + 1, c + c // 2 + 3, 2 * c + T // 2 + S // 2 + 1, n - 3):
        p = min(max(p, 2), n - 3)
        while p < n - 2 and any(m > 1 and p % m == 0 for m in (S, T, C)):
            p += 1
        out.add(p)
    return sorted(out)


def doc_probe(tokens: Tensor, bos: int, C: int) -> tuple[int, int, int] | None:
    """(lo, b, e): tokens [lo, b) before a BOS at b to change and the targets b+1..e of its own document to
    compare, all inside one TTT chunk after the first (scored before any step trained on that chunk)."""
    n, starts = tokens.numel(), (tokens == bos).nonzero().flatten().tolist()
    for b in sorted(starts, key=lambda b: (b < C, b)):
        c = b // C
        lo, e = max(c * C + 1, b - 16), min([x for x in starts if x > b] + [(c + 1) * C, n - 1])
        if lo < b < e:
            return lo, b, e
    return None


@dataclass
class Verdict:
    head: str
    parts: dict  # condition -> (ok, evidence)
    ok = property(lambda self: all(ok for ok, _ in self.parts.values()))
    failed = property(lambda self: [f"{k}: {e}" for k, (ok, e) in self.parts.items() if not ok])
    line = property(lambda self: f"legality_check:{'pass' if self.ok else 'FAIL'} {self.head} | "
                    + " | ".join(f"{k} {'ok' if ok else 'FAIL'}: {e}" for k, (ok, e) in self.parts.items()))


def check_legality(cfg, model, tokens: Tensor, tbytes, rt, key: str = "-") -> Verdict:
    """Run the real eval on a bounded prefix (8 windows or 3 TTT chunks, two adaptations) once with its tap, then once per
    probe p with every token after p changed. C1: every scored NLL of a target <= p and the logit row
    that scores target p+1 stay bit-identical (with eval_doc_isolated also: changing the document before a
    BOS leaves its own targets unchanged); C2: each scored NLL is logsumexp over all vocab_size logits
    minus the target's (within C2_TOL); C3: every target a TTT step trained on was scored before that step;
    C4: each target scored exactly once and the reported NLLs are the scored ones; sync: every rank holds
    identical params after each adaptation. The model is left as it was."""
    t0 = time.perf_counter()
    T, C, V = cfg.eval_seq_len or cfg.train_seq_len, cfg.ttt_chunk_tokens, cfg.vocab_size
    full, n = tokens.numel(), min(tokens.numel(), max(8 * T, 3 * C) + 1)
    tokens, probes = tokens[:n], probe_positions(n, T, cfg.eval_stride, C)
    a, acc = tapped(cfg, model, tokens, tbytes, rt, [p + 1 for p in probes], c2=True)
    moved, rows, worst = 0, 0, 0.0
    for i, p in enumerate(probes):
        b, _ = tapped(cfg, model, changed_from(tokens, p + 1, n, V), tbytes, rt, [p + 1], until=p + 1)
        diff = (a["nll"][1 : p + 1] - b["nll"][1 : p + 1]).abs()
        moved, worst = moved + int((diff != 0).sum()), max(worst, float(diff.max()))
        rows += int(not torch.equal(a["rows"][i], b["rows"][0]))
    parts = {"C1": (moved == rows == 0, f"{moved} of {sum(probes)} scores of targets <= p and {rows} of {len(probes)} logit rows "
                    f"of target p+1 changed (max diff {worst:.3g}) at p={','.join(map(str, probes))}")}
    probe = doc_probe(tokens, cfg.bos_id, C) if cfg.eval_doc_isolated else None
    if probe:
        lo, bos, e = probe
        d, _ = tapped(cfg, model, changed_from(tokens, lo, bos, V), tbytes, rt, [], until=e)
        moved = int((a["nll"][bos + 1 : e + 1] != d["nll"][bos + 1 : e + 1]).sum())
        parts["C1-doc"] = (moved == 0, f"{moved} of {e - bos} scores of targets {bos + 1}..{e} changed when tokens {lo}..{bos - 1} "
                           f"before their BOS at {bos} changed")
    elif cfg.eval_doc_isolated:
        parts["C1-doc"] = (False, "no BOS with room to probe in the prefix")
    parts["C2"] = (a["gap"] <= C2_TOL and a["bad_rows"] == 0, f"max |scored NLL - (logsumexp of {V} logits - target logit)| "
                   f"{a['gap']:.3g} (tol {C2_TOL:g}); {a['bad_rows']} logit rows not {V} wide or not finite")
    parts["C3"] = (a["early"] == 0, f"{a['steps']} TTT steps trained on {a['trained_targets']} targets, {a['early']} of them "
                   "before they were scored" + (f" (first: target {a['first_early']})" if a["early"] else ""))
    cnt, (nll, count, _) = a["count"][1:], acc.sums.tolist()
    replaced, total_ok = int((acc.nll != a["nll"]).sum()), abs(nll - float(a["nll"].sum())) <= 1e-9 * abs(nll) and count == n - 1
    once, never, more = int((cnt == 1).sum()), int((cnt == 0).sum()), int((cnt > 1).sum())
    parts["C4"] = (once == n - 1 and int(a["count"][0]) == 0 and replaced == 0 and total_ok,
                   f"{once} of {n - 1} targets scored once, {never} never, {more} more than once; {replaced} reported scores differ "
                   f"from the first scoring; reported total {'=' if total_ok else '!='} the scored NLL sum over {n - 1} targets")
    parts["sync"] = (a["diverged"] == 0,
                     f"params differ across {rt.world_size} rank(s) after {a['diverged']} of {a['adaptations']} adaptations")
    head = (f"key:{key} mode:{cfg.eval_mode} ranks:{rt.world_size} prefix:{n}/{full} runs:{2 + len(probes) if probe else 1 + len(probes)} "
            f"time:{time.perf_counter() - t0:.1f}s")
    return Verdict(head, parts)


def eval_key(cfg, artifact: str) -> str:
    """What a legality check vouches for: the eval/TTT keys (bar the time budget), the artifact and this code."""
    keys = {f.name: getattr(cfg, f.name) for f in fields(TTTConfig) if f.name != "eval_budget_seconds"}
    h = hashlib.sha256(repr(sorted(keys.items())).encode())
    for path in (artifact, __file__):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


# -----------------------------------------------------------------------------
# CLI


def val_stream(cfg, sp, stream: np.ndarray) -> tuple[Tensor, Tensor]:
    """The val tokens to score and the bytes of each target: the whole stream, or with eval_trim the seeds'
    prefix of whole train_seq_len windows (the one train_gpt.py's roundtrip eval reads), so both score the
    same targets. Bytes come from the whole stream first: a CaseOps sidecar matches it entry for entry."""
    tbytes = tg.val_target_bytes(cfg, sp, stream)
    n = tg.usable_val(stream, cfg.train_seq_len).size if cfg.eval_trim else stream.size
    return torch.from_numpy(stream[:n].astype(np.int32)), torch.from_numpy(tbytes[:n])


FLAGS = """
flags:
  --artifact FILE.ptz     the artifact to score (required); its config sets every model key
  --config FILE.toml      eval/TTT keys (model keys in it are ignored with a note)
  --check-legality        run the C1-C4 self-check on a val prefix instead of scoring, then exit
  --allow-illegal         let eval_mode=prequant_ttt run (a non-record score)
  --allow-data-mismatch   score val shards / a tokenizer other than the artifact's fingerprint (refused in record_mode)
Each eval is one block in the log: eval_start ... block:ID, then eval_end block:ID status:ok|failed.
"""


def load(cfg_path, overrides, artifact: str):
    import quantize

    state, art_cfg, header = quantize.read_artifact(artifact)
    cfg, notes = resolve_config(art_cfg, cfg_path, overrides)
    if cfg.eval_doc_isolated:
        cfg.doc_attention = True
    return cfg, notes, state, header.get("dataset") or {}


def check_data(cfg, want: dict, stream: np.ndarray, allow: bool, log) -> None:
    """Score only the val tokens and tokenizer the artifact was made with (its dataset fingerprint)."""
    if not want:
        return log("eval_note:the artifact records no dataset fingerprint (written before it did): val data not verified")
    got = tg.dataset_fingerprint(stream, cfg.tokenizer_path)
    diff = [f"{k} {str(got[k])[:16]} != {str(want.get(k))[:16]}" for k in got if got[k] != want.get(k)]
    if not diff:
        return log(f"eval_data:matches the artifact's fingerprint val_sha256={got['val_sha256'][:16]} val_tokens:{got['val_tokens']}")
    msg = f"data_path={cfg.data_path} tokenizer_path={cfg.tokenizer_path} are not the data this artifact was made with ({', '.join(diff)})"
    if cfg.record_mode or not allow:
        raise tg.DataError(msg + ("; record_mode refuses --allow-data-mismatch" if allow else
                                  "; point data_path/tokenizer_path at its dataset (or --allow-data-mismatch, never a record)"))
    log(f"eval_data:MISMATCH {msg}; --allow-data-mismatch: this score is not comparable to the artifact's and is no record")


def main(argv: list[str]) -> None:
    t_all = time.perf_counter()
    flags = {a for a in argv if a in ("--check-legality", "--allow-illegal", "--allow-data-mismatch")}
    argv = [a for a in argv if a not in flags]
    opts, overrides = tg.parse_cli(argv, ("config", "artifact"), usage=(__doc__ or "") + FLAGS, keys=EVAL_KEYS)
    artifact = opts["artifact"]
    if not artifact:
        raise ValueError("give the artifact: ttt_eval.py --artifact runs/ID/final_model.<scheme>.ptz (see ttt_eval.py -h)")
    cfg, notes, state, dataset = load(opts["config"], overrides, artifact)
    legality = MODES[cfg.eval_mode]
    if legality != "legal" and cfg.record_mode:
        raise ValueError(f"eval_mode={cfg.eval_mode} is not a legal record eval ({WHY[cfg.eval_mode]}); record_mode refuses it")
    if cfg.eval_mode == "prequant_ttt" and "--allow-illegal" not in flags:
        raise ValueError(f"eval_mode=prequant_ttt {WHY['prequant_ttt']}; it runs only with --allow-illegal, as a non-record")
    rt = tg.init_runtime(cfg)
    log = tg.Logger(rt, cfg.run_id or "eval", append=True)
    block = uuid.uuid4().hex[:8]  # a later eval of the same log never mixes with this one
    log(f"eval_start artifact:{artifact} bytes:{Path(artifact).stat().st_size} mode:{cfg.eval_mode} legality:{legality} block:{block}")
    try:
        result = evaluate(cfg, rt, log, state, dataset, flags, notes, legality, t_all, eval_key(cfg, artifact))
    except BaseException as e:  # the block ends in the log on every way out (kill -9 aside: a block without an end is incomplete)
        log(f"eval_end block:{block} status:failed error:{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise
    log(f"eval_end block:{block} status:ok {result}")


def evaluate(cfg, rt, log, state, dataset: dict, flags: set, notes: list, legality: str, t_all: float, key: str) -> str:
    """One eval block's work; returns what its end marker records."""
    src = Path(__file__).read_bytes()
    log(f"eval_code:ttt_eval.py bytes:{len(src)} sha256:{hashlib.sha256(src).hexdigest()[:16]} argv:{' '.join(sys.argv)}")
    for n in notes:
        log(f"eval_note:{n}")
    if legality != "legal":
        log(f"eval_legality:{legality} reason:{WHY[cfg.eval_mode]}")
    sp = tg.load_tokenizer(cfg)
    stream = tg.load_val_stream(tg.shard_files(cfg.data_path, "val"), cfg.vocab_size)
    check_data(cfg, dataset, stream, "--allow-data-mismatch" in flags, log)
    tokens, tbytes = val_stream(cfg, sp, stream)
    tbytes = tbytes.to(rt.device)
    model = tg.GPT(cfg)
    model.load_state_dict(tg.rebank(state), strict=True)
    model.looping = cfg.num_loops > 0
    model.to(rt.device)
    use_compile = cfg.compile and rt.device.type == "cuda"
    fn = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    times = {"load": time.perf_counter() - t_all}
    log(f"eval_config: seq_len:{cfg.eval_seq_len or cfg.train_seq_len} stride:{cfg.eval_stride} val_tokens:{tokens.numel()} "
        f"world_size:{rt.world_size} doc_isolated:{cfg.eval_doc_isolated} chunk:{cfg.ttt_chunk_tokens} opt:{cfg.ttt_optimizer} "
        f"lr:{cfg.ttt_lr} epochs:{cfg.ttt_epochs} freeze:{cfg.ttt_freeze_blocks}")
    log(f"eval_key:{key}")  # a passing legality_check with this key vouches for this eval (make_record reads both)
    if "--check-legality" in flags:
        verdict = check_legality(cfg, model, tokens, tbytes, rt, key)
        log(verdict.line)
        if not verdict.ok:
            raise ValueError(f"eval_mode={cfg.eval_mode} fails the legality check: {verdict.failed[0]}")
        return f"legality_check:pass key:{key} mode:{cfg.eval_mode}"
    if use_compile:  # compile warmup on random tokens only: real val tokens must not be trained on early
        t = time.perf_counter()
        start = copy.deepcopy(model.state_dict())
        rand = torch.randint(0, cfg.vocab_size, (4 * (cfg.eval_seq_len or cfg.train_seq_len) + 1,), dtype=torch.int32)
        run_mode(copy.copy(cfg), model, fn, rand, torch.ones_like(rand, device=rt.device), rt)
        model.load_state_dict(start)
        times["warmup"] = time.perf_counter() - t
        log(f"eval_warmup: random tokens, no val data, {times['warmup']:.1f}s")
    if cfg.eval_mode != "sliding" and cfg.eval_sliding_first:
        t = time.perf_counter()
        loss, bpb = run_mode(dataclasses.replace(cfg, eval_mode="sliding"), model, fn, tokens, tbytes, rt).result()
        log(f"final_sliding_window val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
        log(f"final_sliding_window_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        times["sliding"] = time.perf_counter() - t
    t = time.perf_counter()
    loss, bpb = run_mode(cfg, model, fn, tokens, tbytes, rt, log, times=times).result()
    name = {"sliding": "final_sliding_window"}.get(cfg.eval_mode, cfg.eval_mode)
    log(f"{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
    log(f"{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    wall = time.perf_counter() - t_all
    log("eval_phases: " + " ".join(f"{k}:{times.get(k, 0.0):.1f}s" for k in ("load", "warmup", "sliding", "scoring", "training")))
    log(f"eval_wallclock:{wall:.1f}s budget:{cfg.eval_budget_seconds:.0f}s verdict:{'ok' if wall <= cfg.eval_budget_seconds else 'OVER'}")
    if tg.dist.is_available() and tg.dist.is_initialized():
        tg.dist.barrier()
    return f"score:{name} val_bpb:{bpb:.8f}"


if __name__ == "__main__":
    sys.modules.setdefault("ttt_eval", sys.modules[__name__])  # train_gpt's config loader imports this module
    tg.run_cli(main)
