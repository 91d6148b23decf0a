"""ttt_eval.py: score an artifact on the whole val set - sliding windows and legal score-first TTT.

  torchrun --standalone --nproc_per_node=8 ttt_eval.py --artifact runs/ID/final_model.mixed.ptz [--config X.toml]
  python3 ttt_eval.py --artifact A --eval_mode=sliding          # one process, CPU or GPU
  python3 ttt_eval.py --artifact A --check-legality             # C1-C4 on a short stream, then exit

Reads the artifact (weights + the config it was trained with) and the val shards, never training
data. Model keys come from the artifact; eval/TTT keys from the artifact's config unless the TOML,
an UPPER_CASE env var or a --key=value flag sets them. Appends to logs/<run_id>.txt (the training
log). Modes: sliding; legal_ttt (score a chunk, then train on it: PR #461/#473/#526/#1812 style);
multipass_min (PR #573: per-token min over trajectories, illegal selection, refused in
record_mode) and prequant_ttt (PR #1550: trains on all of val before scoring, needs --allow-illegal).
"""
from __future__ import annotations

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
    eval_mode: str = "sliding"  # sliding | legal_ttt | multipass_min | prequant_ttt
    eval_seq_len: int = 0  # window length (0 = train_seq_len)
    eval_stride: int = 64  # scored positions per window after the first
    eval_batch_seqs: int = 32  # windows per scoring batch
    eval_doc_isolated: bool = False  # no attention across BOS inside a window
    eval_sliding_first: bool = True  # TTT modes also log the sliding score of the untouched artifact
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


MODES = {"sliding": "legal", "legal_ttt": "legal", "multipass_min": "illegal-selection", "prequant_ttt": "non-record"}
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
def score(cfg, fn, tokens: Tensor, wins: list, luts, acc: Scores, device) -> None:
    """Score windows under no_grad (not inference_mode: nothing made here may later poison a
    backward), batched by length; targets before each window's offset are context only."""
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
            acc.add(nll[keep], tg.target_bytes(x, y, luts)[keep], idx)
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
            logits = self.fn(x).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if self.cfg.ttt_zloss:
            loss = loss + self.cfg.ttt_zloss * torch.logsumexp(logits, -1).square().mean()
        return loss

    def train(self, tokens: Tensor, lo: int, hi: int, lr: float, epochs: int) -> None:
        """Train on pairs (tokens[i], tokens[i+1]) for i in [lo, hi): sequences split across ranks."""
        T = self.cfg.eval_seq_len or self.cfg.train_seq_len
        seqs = list(range(lo, hi - T + 1, T))
        bs = self.cfg.ttt_batch_seqs
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        for _ in range(epochs if seqs else 0):
            for s in range(0, len(seqs), bs):
                step = seqs[s : s + bs]
                for p in self.params:
                    p.grad = torch.zeros_like(p)
                batch = mine(step, self.rt)
                if batch:  # a rank without sequences still joins the reduction with zero gradients
                    pos = torch.tensor(batch)[:, None] + torch.arange(T + 1)
                    chunk = tokens[pos].to(self.rt.device, torch.int64)
                    (self.loss(chunk[:, :-1], chunk[:, 1:]) * (len(batch) / len(step))).backward()
                grads = [p.grad for p in self.params]
                if self.rt.distributed:
                    flat = tg.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
                    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
                if self.cfg.ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.cfg.ttt_grad_clip)
                self.opt.step()
                with torch.no_grad():
                    for bank, j, w in self.keep:
                        bank[j] = w
        self.model.zero_grad(set_to_none=True)


def chunked(cfg, n_tokens: int, wins: list) -> tuple[int, list[list]]:
    """Windows grouped by the chunk holding their first scored target (targets 1..N-1, C per chunk)."""
    C = cfg.ttt_chunk_tokens
    n_chunks = math.ceil((n_tokens - 1) / C)
    groups = [[] for _ in range(n_chunks)]
    for w in wins:
        groups[(w[0] + w[2]) // C].append(w)
    return n_chunks, groups


def legal_ttt(cfg, model, fn, tokens, wins, luts, rt, log, track=False, rotate=0, times=None) -> Scores:
    """Score-first TTT: for each chunk, score all its windows with the current weights, then (except
    for the last chunk) train on the chunk's tokens; LR cosine over chunks. rotate > 0 starts at a
    later chunk and wraps: only the illegal multi-pass mode does that."""
    acc, adapter = Scores(tokens.numel(), rt.device, track), Adapter(model, fn, cfg, rt)
    n_chunks, groups = chunked(cfg, tokens.numel(), wins)
    C, times = cfg.ttt_chunk_tokens, times if times is not None else {}
    for k in range(n_chunks):
        c = (k + rotate) % n_chunks
        t = time.perf_counter()
        score(cfg, fn, tokens, mine(groups[c], rt), luts, acc, rt.device)
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


def run_mode(cfg, model, fn, tokens, luts, rt, log=None, track=False, times=None) -> Scores:
    """One full evaluation in cfg.eval_mode; the model ends adapted (callers restore it)."""
    T = cfg.eval_seq_len or cfg.train_seq_len
    wins = windows(tokens.numel(), T, cfg.eval_stride)
    times = times if times is not None else {}
    if cfg.eval_mode == "sliding":
        acc = Scores(tokens.numel(), rt.device, track)
        t = time.perf_counter()
        score(cfg, fn, tokens, mine(wins, rt), luts, acc, rt.device)
        times["scoring"] = time.perf_counter() - t
        return acc.reduce()
    if cfg.eval_mode == "legal_ttt":
        return legal_ttt(cfg, model, fn, tokens, wins, luts, rt, log, track, times=times).reduce()
    if cfg.eval_mode == "prequant_ttt":  # illegal: adapt on all of val, re-quantize, then score
        t = time.perf_counter()
        Adapter(model, fn, cfg, rt).train(tokens, 0, tokens.numel() - 1, cfg.ttt_lr, cfg.ttt_epochs)
        requantize(model, cfg)
        times["training"] = time.perf_counter() - t
        acc = Scores(tokens.numel(), rt.device, track)
        score(cfg, fn, tokens, mine(wins, rt), luts, acc, rt.device)
        return acc.reduce()
    # multipass_min (illegal): pass 0 scores the artifact; later passes restart from it, rotated
    start = copy.deepcopy(model.state_dict())
    n_chunks = chunked(cfg, tokens.numel(), wins)[0]
    passes = []
    for p in range(cfg.ttt_passes):
        model.load_state_dict(start)
        if p == 0:
            acc = Scores(tokens.numel(), rt.device, True)
            score(cfg, fn, tokens, mine(wins, rt), luts, acc, rt.device)
        else:
            acc = legal_ttt(cfg, model, fn, tokens, wins, luts, rt, log, True, rotate=p * n_chunks // cfg.ttt_passes, times=times)
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
# Legality self-check


def check_legality(cfg, model, tokens: Tensor, luts, rt, p: int | None = None) -> list[str]:
    """Run the mode twice, the second time with every token after position p replaced. C1/C3: every
    target at or before p keeps a bit-identical score; C4: every target is scored exactly once; C2:
    the model's distribution sums to 1 over the whole vocabulary at sampled positions.
    Returns failure lines (empty = legal)."""
    p = p or tokens.numel() // 2
    start = copy.deepcopy(model.state_dict())
    a = run_mode(cfg, model, model, tokens, luts, rt, track=True)
    model.load_state_dict(start)
    changed = tokens.clone()
    g = torch.Generator().manual_seed(1234)
    changed[p + 1 :] = (tokens[p + 1 :] + torch.randint(1, cfg.vocab_size, (tokens.numel() - p - 1,), generator=g)) % cfg.vocab_size
    b = run_mode(cfg, model, model, changed, luts, rt, track=True)
    model.load_state_dict(start)
    fails = []
    if not torch.equal(a.nll[1 : p + 1], b.nll[1 : p + 1]):
        n = int((a.nll[1 : p + 1] != b.nll[1 : p + 1]).sum())
        fails.append(f"C1/C3 failed: {n} of the {p} scores at or before position {p} changed when only later tokens changed")
    if not (bool((a.count[1:] == 1).all()) and int(a.count[0]) == 0):
        fails.append(f"C4 failed: targets scored {int(a.count[1:].min())}..{int(a.count[1:].max())} times (must be exactly once)")
    with torch.no_grad(), tg.autocast(cfg, rt.device):
        T = min(cfg.eval_seq_len or cfg.train_seq_len, tokens.numel())
        lp = torch.log_softmax(model(tokens[:T][None].to(rt.device, torch.int64)).float(), -1)
    mass = lp.exp().sum(-1)
    if not torch.allclose(mass, torch.ones_like(mass), atol=1e-4):
        fails.append(f"C2 failed: the distribution sums to {mass.min().item():.6f}..{mass.max().item():.6f}")
    return fails


# -----------------------------------------------------------------------------
# CLI


FLAGS = """
flags:
  --artifact FILE.ptz     the artifact to score (required); its config sets every model key
  --config FILE.toml      eval/TTT keys (model keys in it are ignored with a note)
  --check-legality        run C1-C4 on a short stream instead of scoring, then exit
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
    opts, overrides = tg.parse_cli(argv, ("config", "artifact"), usage=__doc__ + FLAGS, keys=EVAL_KEYS)
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
        result = evaluate(cfg, rt, log, state, dataset, flags, notes, legality, t_all)
    except BaseException as e:  # the block ends in the log on every way out (kill -9 aside: a block without an end is incomplete)
        log(f"eval_end block:{block} status:failed error:{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise
    log(f"eval_end block:{block} status:ok {result}")


def evaluate(cfg, rt, log, state, dataset: dict, flags: set, notes: list, legality: str, t_all: float) -> str:
    """One eval block's work; returns what its end marker records."""
    src = Path(__file__).read_bytes()
    log(f"eval_code:ttt_eval.py bytes:{len(src)} sha256:{hashlib.sha256(src).hexdigest()[:16]} argv:{' '.join(sys.argv)}")
    for n in notes:
        log(f"eval_note:{n}")
    if legality != "legal":
        log(f"eval_legality:{legality} reason:{WHY[cfg.eval_mode]}")
    sp = tg.load_tokenizer(cfg)
    luts = tuple(torch.from_numpy(a).to(rt.device) for a in tg.build_byte_luts(sp, cfg.vocab_size))
    stream = tg.load_val_stream(tg.shard_files(cfg.data_path, "val"), cfg.vocab_size)
    check_data(cfg, dataset, stream, "--allow-data-mismatch" in flags, log)
    tokens = torch.from_numpy(stream.astype(np.int32))
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
    if "--check-legality" in flags:
        # enough tokens for several TTT chunks at the configured size, so adaptation really runs
        n = max(8 * (cfg.eval_seq_len or cfg.train_seq_len), 4 * cfg.ttt_chunk_tokens) + 1
        fails = check_legality(cfg, model, tokens[: min(tokens.numel(), n)], luts, rt)
        log("legality_check:" + ("pass C1 C2 C3 C4" if not fails else " FAIL " + "; ".join(fails)) + f" mode:{cfg.eval_mode}")
        if fails:
            raise ValueError(f"eval_mode={cfg.eval_mode} fails the legality check: {fails[0]}")
        return f"legality_check:pass mode:{cfg.eval_mode}"
    if use_compile:  # compile warmup on random tokens only: real val tokens must not be trained on early
        t = time.perf_counter()
        start = copy.deepcopy(model.state_dict())
        rand = torch.randint(0, cfg.vocab_size, (4 * (cfg.eval_seq_len or cfg.train_seq_len) + 1,), dtype=torch.int32)
        run_mode(copy.copy(cfg), model, fn, rand, luts, rt)
        model.load_state_dict(start)
        times["warmup"] = time.perf_counter() - t
        log(f"eval_warmup: random tokens, no val data, {times['warmup']:.1f}s")
    if cfg.eval_mode != "sliding" and cfg.eval_sliding_first:
        t = time.perf_counter()
        loss, bpb = run_mode(dataclasses.replace(cfg, eval_mode="sliding"), model, fn, tokens, luts, rt).result()
        log(f"final_sliding_window val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
        log(f"final_sliding_window_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        times["sliding"] = time.perf_counter() - t
    t = time.perf_counter()
    loss, bpb = run_mode(cfg, model, fn, tokens, luts, rt, log, times=times).result()
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
