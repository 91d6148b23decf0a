"""Parameter Golf trainer: config, model, optimizers, training loop, artifact.

Launch:  torchrun --standalone --nproc_per_node=8 train_gpt.py --config configs/baseline.toml
         python3 train_gpt.py --config configs/smoke.toml        (one process, CPU or GPU)
Config sources, later wins: Config defaults < TOML file < env vars named like the field in
UPPER_CASE (NUM_LAYERS, SEED, ...) < --key=value flags. Importing this file does no work.
"""
from __future__ import annotations

import copy
import difflib
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import quantize  # a leaf; its export grid (quantize.step) is the one QAT trains against

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None

HERE = Path(__file__).resolve().parent
SIZE_CAP_BYTES = quantize.SIZE_CAP_BYTES  # decimal, not MiB
CODE_FILES = quantize.CODE_FILES  # the files whose bytes count

# -----------------------------------------------------------------------------
# CONFIG

@dataclass
class Config:
    # data and run identity
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # dataset dir holding fineweb_{train,val}_NNNNNN.bin shards (and manifest.json)
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # SentencePiece .model the shards were made with
    run_id: str = ""  # "" -> a fresh id; logs go to logs/<run_id>.txt
    out_dir: str = ""  # "" -> runs/<run_id>; checkpoints and the artifact land here
    seed: int = 1337  # seeds Python, numpy and torch (model init, GPTQ self-calibration)
    data_check_train_shards: int = 1  # train shards scanned for val documents at start (0 = skip)
    caseops_enabled: bool = False  # CaseOps data (PR #1855): val_bpb divides by the dataset's byte sidecar (original text bytes)
    train_loader: str = "sequential"  # sequential (official: the shards in order, contiguous slices) | shuffled (PR #1812)
    # schedule and batch
    iterations: int = 20000  # optimizer steps, unless max_wallclock_seconds stops training first
    warmdown_iters: int = 1200  # steps of linear LR decay at the end (iter_warmdown; converted to wallclock under a cap)
    warmup_steps: int = 20  # compile-priming steps, reverted afterwards; not an LR warmup
    warmup_revert_momentum: bool = True  # false: Muon momentum of the warmup steps carries into step 0 (PR #1855 kept it)
    train_batch_tokens: int = 524288  # global tokens per optimizer step
    train_seq_len: int = 1024  # tokens per training sequence
    max_wallclock_seconds: float = 600.0  # <= 0 disables the cap
    virtual_world_size: int = 8  # grad_accum = virtual_world_size // WORLD_SIZE: same batch on 1..8 GPUs
    # eval and logging
    val_batch_size: int = 524288  # global tokens per validation batch
    val_loss_every: int = 1000  # steps between validation evals during training (0 = only at the end)
    train_log_every: int = 200  # steps between train_loss log lines
    # model (defaults = the baseline; every record technique is off until a config turns it on)
    vocab_size: int = 1024  # model vocabulary; must equal the tokenizer's
    bos_id: int = 1  # document-start token id; must equal the tokenizer's
    num_layers: int = 9  # transformer blocks
    num_cores: int = 0  # distinct weight cores; layer i uses core i % num_cores (PR #526); 0 = num_layers
    model_dim: int = 512  # residual stream width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (fewer than num_heads = GQA)
    mlp_mult: float = 2.0  # MLP hidden width = mlp_mult * model_dim
    mlp_act: str = "relu2"  # relu2 | lrelu2 | silu2 (squared activations)
    mlp_leaky_slope: float = 0.5  # negative slope of lrelu2
    tie_embeddings: bool = True  # the output head reuses the input embedding
    tied_embed_init_std: float = 0.005  # init std of the tied embedding
    ortho_init: bool = False  # Q, K, V, up and side projections orthogonal
    proj_init: str = "ortho"  # ortho | ortho_scaled (x 1/sqrt(2*num_layers): PR #573/#526) | zero: bigram.proj/ve.proj init
    embed_scale: bool = False  # learnable per-dim scale before the input norm (PR #1812)
    rope_base: float = 10000.0  # RoPE base frequency
    rope_dims: int = 0  # rotary dims per head (records: 16 of 64); 0 = all
    rope_ntk_len: int = 0  # NTK-rescale the base for windows longer than this (0 = off); SP1024-era scripts used 1024
    logit_softcap: float = 30.0  # logits = softcap * tanh(logits / softcap)
    qk_gain_init: float = 1.5  # initial per-head query gain
    qk_gain_split: bool = False  # separate q gains for rope and nope dims (PR #1812)
    xsa_last_n: int = 0  # exclusive self attention on the last N weight cores (= layers unless num_cores shares them)
    ln_scale: bool = False  # sublayer inputs scaled by 1/sqrt(layer+1)
    skip_gates: bool = False  # sigmoid-gated U-Net skips
    num_skips: int = -1  # -1 = min(encoder, decoder) of the longest layer schedule
    smear: str = "none"  # none | v2 (per-dim gate after the norm) | v3 (input-dependent, additive)
    gate_window: int = 12  # residual dims read by smear v3 and the sparse attention gates
    bos_mask: bool = True  # smear/bigram never mix a token with the one before a BOS
    bigram_buckets: int = 0  # BigramHash table rows (0 = off)
    bigram_dim: int = 128  # BigramHash embedding width
    ve_layers: str = ""  # value embeddings on these layers, e.g. "9,10"
    ve_dim: int = 128  # value-embedding width
    attn_gate: str = "none"  # none | dense | sparse | out2 (per-head output gates)
    attn_gate_scale: float = 1.0  # dense/sparse attention gates: sigmoid(attn_gate_scale * z)
    parallel_start: int = -1  # parallel residuals from this layer (-1 = off)
    parallel_mode: str = "two_lane"  # gptj | two_lane (learned routing) | lanes (PR #1334, lane_merge)
    lane_skip: str = "lane0"  # lane0 (split, then the U-Net skip joins lane 0: #1855) | stream (skip, then split: PR #1550)
    loop_start: int = -1  # depth recurrence: layers loop_start..loop_end run num_loops extra times
    loop_end: int = -1  # last looped layer (inclusive)
    num_loops: int = 0  # extra passes over loop_start..loop_end (0 = no depth recurrence)
    loop_at_frac: float = 0.0  # ...once this fraction of the training clock has passed
    loop_at_step: int = 0  # ...or this step (0 = use loop_at_frac)
    loop_ln_scale: bool = False  # looped layers' ln scale / sqrt(num_loops+1) (PR #1812)
    core_grad_scale: bool = False  # shared cores get the mean of their layers' grads (PR #526)
    attn_backend: str = "auto"  # auto (FA3 on Hopper when importable, else SDPA) | fa3 | sdpa
    doc_attention: bool = False  # attention never crosses a BOS
    fused_ce: bool = False  # Triton softcapped cross-entropy (PR #1855) on CUDA; eager without triton
    fused_mlp: bool = False  # Triton up-projection + relu2/lrelu2 (PR #1855) on CUDA; eager without triton or under GPTQ/LoRA hooks
    # optimizers
    embed_lr: float = 0.6  # AdamW LR of an untied input embedding
    head_lr: float = 0.008  # AdamW LR of an untied output head
    tied_embed_lr: float = 0.05  # AdamW LR of the tied embedding
    matrix_lr: float = 0.04  # Muon LR of the 2-D matrices
    scalar_lr: float = 0.04  # AdamW LR of the scalars, gains and control tensors
    muon_momentum: float = 0.95  # Muon momentum after its warmup
    muon_backend_steps: int = 5  # Newton-Schulz iterations per Muon step
    muon_ns: str = "ns5"  # ns5 | polar (Polar Express coefficients)
    muon_grad_dtype: str = "fp32"  # fp32 | bf16 (PR #1855: half the bytes); dtype of the bank-gradient reduce-scatter; no effect on 1 rank
    muon_row_norm: bool = False  # MuonEq-R
    muon_wd: float = 0.0  # Muon decoupled weight decay
    muon_wd_mlp: float = -1.0  # -1 = muon_wd
    muon_momentum_dtype: str = "fp32"  # fp32 | bf16 (banked records: gradient, momentum buffer and Nesterov sum in bf16)
    muon_momentum_warmup_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 500  # steps of linear Muon momentum warmup
    muon_momentum_warmup_frac: float = 0.0  # > 0: warm up over this fraction of training instead
    muon_momentum_warmdown: float = 0.0  # > 0: in the LR warmdown mu = b*mu + (1-b)*this, b = max(lr_mul, 0.25) (PR #1812: 0.92)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    embed_wd: float = 0.0  # AdamW weight decay of the embeddings
    adam_wd: float = 0.0  # AdamW weight decay of the scalar group
    adam_matrix_patterns: str = ""  # 2-D params whose names contain these go to scalar AdamW, not Muon
    grad_clip_norm: float = 0.0  # grad-norm clip (0 = off), by grad_clip_rule
    grad_clip_rule: str = "global"  # global (norm of the reduced gradient) | local (each rank clips its own, then reduce: PR #473)
    lr_schedule: str = "iter_warmdown"  # iter_warmdown | frac_warmdown | cosine
    warmdown_frac: float = 0.0  # frac_warmdown: fraction of the training clock spent in LR warmdown
    min_lr: float = 0.0  # LR multiplier floor of frac_warmdown and cosine
    weight_average: str = "none"  # none | ema | swa: which average replaces the weights at the end
    ema_decay: float = 0.997  # EMA decay per step (weight_average=ema)
    swa_every: int = 50  # steps between SWA snapshots (weight_average=swa)
    swa_lr_threshold: float = 0.2  # SWA collects once the LR multiplier is below this
    qat: bool = False  # late STE QAT on the bank matrices, on the export grid
    qat_lr_threshold: float = 0.15  # late QAT switches on once the LR multiplier is below this
    control_tensor_name_patterns: str = (  # comma-separated name parts of control tensors (AdamW, kept float)
        "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,skip_weights,"
        "skip_gates,attn_gate,smear,parallel_,lane_merge,embed_scale,bigram.scale,ve.scale,ve_layer_scales"
    )
    # runtime
    device: str = "auto"  # auto | cuda | cpu
    autocast_dtype: str = "bf16"  # bf16 | fp32
    storage_dtypes: str = "fp32"  # fp32 masters | official (records' cast: embedding tables + Adam state bf16, RoPE from bf16)
    compile: bool = True  # torch.compile(fullgraph) on CUDA; CPU always runs eager
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest resumable checkpoints kept in out_dir

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}

@functools.cache
def config_class() -> type:
    """Config plus the knobs owned by quantize.py (QuantConfig) and, when it sits beside this file, ttt_eval.py
    (TTTConfig): one flat, typed namespace, each knob defined next to the code that reads it."""
    owners = [quantize.QuantConfig]
    if (HERE / "ttt_eval.py").is_file():
        sys.path.insert(0, str(HERE)) if str(HERE) not in sys.path else None
        owners.append(importlib.import_module("ttt_eval").TTTConfig)
    return make_dataclass("RunConfig", [(f.name, f.type, field(default=f.default)) for o in owners for f in fields(o)], bases=(Config,))

@functools.cache
def field_docs() -> dict[str, str]:
    """{key: the comment on its field}: the one source of each key's --help line and of its allowed values."""
    rx, keys = re.compile(r"^    (\w+): \w+ = [^#\n]*#\s*(.+)$", re.M), config_field_types()
    return {k: doc for n in CODE_FILES if (HERE / n).is_file() for k, doc in rx.findall((HERE / n).read_text()) if k in keys}

def config_field_types() -> dict[str, type]:
    return {f.name: _TYPES[f.type] for f in fields(config_class())}

def _check_key(key: str, types: dict, source: str) -> None:
    if key not in types:
        near = difflib.get_close_matches(key, list(types), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown config key '{key}' in {source}{hint}; see `python3 train_gpt.py --help`")

def load_config(path: str | None = None, overrides: dict | None = None, environ=None) -> tuple[Config, dict]:
    """Resolve a Config; returns it and {key: source} for every key not left at its default."""
    types, values, sources = config_field_types(), {}, {}
    if path:
        p = Path(path)
        if not p.is_file() or tomllib is None:
            raise ValueError(f"config file {path} not found" if tomllib else "reading TOML configs needs Python >= 3.11 (tomllib)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        flat = {}
        for k, v in data.items():  # tables only group keys for readability
            flat.update(v if isinstance(v, dict) else {k: v})
        for k, v in flat.items():
            _check_key(k, types, path)
            values[k], sources[k] = _coerce(k, v, types[k], path), path
    environ = os.environ if environ is None else environ
    for k, typ in types.items():
        if k.upper() in environ:
            values[k], sources[k] = _coerce(k, environ[k.upper()], typ, f"env {k.upper()}"), f"env {k.upper()}"
    for k, v in (overrides or {}).items():
        _check_key(k, types, "command-line flags")
        values[k], sources[k] = _coerce(k, v, types[k], f"--{k}"), "flag"
    cfg = config_class()(**values)
    validate_config(cfg)
    return cfg, sources

def validate_config(c: Config) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)

    need(c.model_dim % c.num_heads == 0, f"model_dim={c.model_dim} must be divisible by num_heads={c.num_heads}")
    need(c.num_heads % c.num_kv_heads == 0, f"num_heads={c.num_heads} must be divisible by num_kv_heads={c.num_kv_heads}")
    need((c.model_dim // c.num_heads) % 2 == 0, "head dim (model_dim/num_heads) must be even for RoPE")
    need(c.logit_softcap > 0, f"logit_softcap must be > 0, got {c.logit_softcap}")
    need(c.num_layers >= 1 and c.vocab_size >= 2, "num_layers must be >= 1 and vocab_size >= 2")
    need(c.vocab_size <= 65536, f"vocab_size={c.vocab_size}: shards store uint16 ids, so at most 65,536")
    need(c.tokenizer_path.endswith(".model"), f"tokenizer_path={c.tokenizer_path} must be a SentencePiece .model file")
    need(c.virtual_world_size >= 1, "virtual_world_size must be >= 1")
    need(c.train_seq_len >= 1 and c.train_batch_tokens >= c.train_seq_len, "train_batch_tokens must be >= train_seq_len")
    need(c.iterations >= 0 and c.warmup_steps >= 0, "iterations and warmup_steps must be >= 0")
    need(0 <= c.num_cores <= c.num_layers, f"num_cores={c.num_cores} must be in 0..num_layers (0 = one core per layer)")
    need(c.num_loops == 0 or 0 <= c.loop_start <= c.loop_end < c.num_layers, "loop_start..loop_end must be layers of the model")
    need(c.parallel_start < 0 or c.parallel_start > max(c.loop_end, (c.num_layers - 1) // 2),
         "parallel_start must come after the looped layers and the encoder half")
    need(all(0 <= int(i) < c.num_layers for i in c.ve_layers.split(",") if i.strip()), f"ve_layers={c.ve_layers!r} names a missing layer")
    for f in fields(c):  # a str key whose comment lists choices as 'a (why) | b | c; note' accepts only a, b, c
        parts = field_docs().get(f.name, "").split(";")[0].split(" | ")
        allowed = [re.match(r"\s*([\w.-]*)", x)[1] for x in parts] if f.type == "str" and len(parts) > 1 else []
        need(not allowed or getattr(c, f.name) in allowed, f"{f.name} must be one of {', '.join(allowed)}; got '{getattr(c, f.name)}'")
    quantize.quant_settings(asdict(c))  # quantize.py's own checks (bits per group, ...): a dry run rejects what a run would

USAGE = ("usage: train_gpt.py [--config FILE.toml] [--key=value ...] [--dry-run] [--resume CKPT]\n  --dry-run: check the whole config, "
         "print model_params and the resolved config, train nothing\n  --resume: continue from a checkpoint")

def parse_cli(argv: list[str], paths: tuple = ("config", "resume"), usage: str = USAGE, keys=None) -> tuple[dict, dict]:
    """--config FILE, --resume CKPT, --dry-run, --key=value (or --key value; a bare --flag is true)."""
    opts, overrides, i = {"dry_run": False, **dict.fromkeys(paths)}, {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):
            print(usage.rstrip() + "\nconfig keys (--key=value, env var KEY in upper case, or in the TOML file), default (type): meaning\n"
                  + "\n".join(f"  --{f.name}={f.default!r} ({f.type}): {field_docs().get(f.name, '')}" for f in fields(config_class())
                               if keys is None or f.name in keys))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument '{arg}': options look like --key=value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key != "dry_run" and i < len(argv) and not argv[i].startswith("--"):
                val, i = argv[i], i + 1
            elif key == "dry_run" or config_field_types().get(key) is bool:
                val = "1"
            else:
                raise ValueError(f"option --{key} needs a value (--{key}=VALUE)")
        if key == "dry_run":
            opts[key] = _coerce(key, val, bool, "--dry-run")
        else:
            (opts if key in paths else overrides)[key] = val
    return opts, overrides

# -----------------------------------------------------------------------------
# DISTRIBUTED RUNTIME

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    grad_accum: int
    is_main = property(lambda self: self.rank == 0)
    distributed = property(lambda self: self.world_size > 1)

def init_runtime(cfg: Config) -> Runtime:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.virtual_world_size % world != 0:
        raise ValueError(f"WORLD_SIZE={world} must divide virtual_world_size={cfg.virtual_world_size} "
                         "(grad_accum = virtual_world_size // WORLD_SIZE keeps the global batch fixed)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA GPU; use --device=cpu or auto")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(**(dict(backend="nccl", device_id=device) if use_cuda else dict(backend="gloo")))
        dist.barrier()
    return Runtime(rank, world, local_rank, device, cfg.virtual_world_size // world)

def all_reduce_(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the ranks restart their clocks together (after validation, checkpoint writes)

# DATA and BYTE ACCOUNTING live in data_loader.py (shards, loader, integrity check, byte LUTs); re-exported here
sys.path.insert(0, str(HERE))  # a record folder runs from any cwd
from quantize import coerce as _coerce  # noqa: E402  (one typing rule for the trainer and the quantize CLI)
from data_loader import (  # noqa: E402,F401
    SHARD_HEADER_BYTES, SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, DataError, DistributedTokenLoader, TokenStream,
    bits_per_byte, build_byte_luts, check_dataset, check_outputs, check_token_range, dataset_fingerprint, load_shard, load_tokenizer,
    load_val_stream, make_loader, read_shard_header, shard_files, target_bytes, usable_val, val_target_bytes)
import kernels  # noqa: E402

# -----------------------------------------------------------------------------
# MODEL: baseline GPT + every record technique behind a config key. Block matrices live in four
# 3-D banks (one slice per weight core) so Muon can shard whole matrices across ranks.

try:  # FlashAttention 3 (Hopper); anything else uses torch SDPA
    from flash_attn_interface import flash_attn_func as _fa3
except ImportError:
    _fa3 = None
CAPTURE = None  # set by GPTQ calibration: called as CAPTURE(weight_name, input) for every named matmul
DELTA = None  # set by phased TTT: DELTA(weight_name, input, output) returns the output plus its per-document LoRA delta

def linear(x: Tensor, w: Tensor, name: str | None = None) -> Tensor:
    if CAPTURE is not None and name is not None:
        CAPTURE(name, x)
    y = F.linear(x, w.to(x.dtype))
    return y if DELTA is None or name is None else DELTA(name, x, y)

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))

def row_scale(w: Tensor, bits: int, rule: str = "max", k: float = 0.0, scale_rule: str = "cover") -> Tensor:
    """Per-row step of the symmetric grid [-r, r]*s, r = 2^(bits-1)-1, clip = row max or k * row std:
    exactly the fp16 step quantize.py exports (quantize.step, quant_scale_rule)."""
    clip = w.float().abs().amax(-1) if rule == "max" else k * torch.nan_to_num(w.float().std(-1))
    return quantize.step(clip, 2 ** (bits - 1) - 1, scale_rule, rule).float().unsqueeze(-1)

def fake_quant(w: Tensor, bits: int, rule: str, k: float, mix: Tensor, scale_rule: str = "cover") -> Tensor:
    """STE: forward sees the export grid when mix=1; gradients pass straight through. mix is a
    tensor so turning QAT on never recompiles (a Python flag is constant-folded by compile)."""
    r = 2 ** (bits - 1) - 1
    s = row_scale(w.detach(), bits, rule, k, scale_rule)
    q = (torch.clamp(torch.round(w.detach().float() / s), -r, r) * s).to(w.dtype)
    return w + mix.to(w.dtype) * (q - w.detach())

def attention(q: Tensor, k: Tensor, v: Tensor, doc: Tensor | None = None, fa3: bool = True) -> Tensor:
    """The one attention path (train, eval, TTT). (B,T,H,D) in and out; GQA when k/v have fewer heads.
    doc: per-token document ids; tokens then attend only within their own document."""
    if fa3 and _fa3 is not None and q.is_cuda and doc is None and q.dtype == torch.bfloat16:
        return _fa3(q, k, v, causal=True)
    mask = None
    if doc is not None:
        T = q.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)

def attention_backend(cfg: Config, device: torch.device) -> str:
    if cfg.attn_backend == "fa3" and _fa3 is None:
        raise ValueError("attn_backend=fa3 but flash_attn_interface is not importable; install FA3 or use attn_backend=auto")
    if _fa3 is not None and device.type == "cuda" and cfg.attn_backend != "sdpa" and not cfg.doc_attention and cfg.autocast_dtype == "bf16":
        return "fa3"
    return "sdpa"

def layer_order(cfg: Config, looping: bool) -> list[int]:
    """Virtual layer schedule: loop_start..loop_end repeated num_loops extra times once looping is on."""
    order = list(range(cfg.num_layers))
    if looping and cfg.num_loops > 0:
        a, b = cfg.loop_start, cfg.loop_end + 1
        order = order[:a] + order[a:b] * (cfg.num_loops + 1) + order[b:]
    return order

class Block(nn.Module):
    """Per-layer scalars and gates; the matrices come from the GPT's banks (core = i % num_cores)."""

    def __init__(self, cfg: Config, i: int):
        super().__init__()
        d, H = cfg.model_dim, cfg.num_heads
        self.i, self.core = i, i % (cfg.num_cores or cfg.num_layers)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        looped = cfg.loop_ln_scale and cfg.loop_start <= i <= cfg.loop_end
        self.ln = (1 / math.sqrt(i + 1) if cfg.ln_scale else 1.0) / (math.sqrt(cfg.num_loops + 1) if looped else 1.0)
        self.xsa = self.core >= (cfg.num_cores or cfg.num_layers) - cfg.xsa_last_n  # PR #526: XSA follows the core
        self.parallel = 0 <= cfg.parallel_start <= i
        if cfg.attn_gate == "dense":
            self.attn_gate_w = nn.Parameter(torch.randn(H, d) * 0.005)
        elif cfg.attn_gate in ("sparse", "out2"):
            self.attn_gate_w = nn.Parameter(torch.zeros(H, cfg.gate_window))

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def attn(self, g: "GPT", x: Tensor, ctx: dict) -> Tensor:
        cfg, c, U = g.cfg, self.core, g.n_cores
        B, T, _ = x.shape
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, g.head_dim
        u = self.ln * rms_norm(x)
        pre = f"blocks.{c}.attn."
        q = linear(u, g.mat(g.qo_bank, c, "attn"), pre + "c_q.weight").view(B, T, H, D)
        k = linear(u, g.mat(g.kv_bank, c, "attn"), pre + "c_k.weight").view(B, T, KV, D)
        v = linear(u, g.mat(g.kv_bank, U + c, "attn"), pre + "c_v.weight")
        if self.i in g.ve_layers:
            v = v + g.ve_layer_scales[g.ve_layers.index(self.i)].to(v.dtype) * ctx["ve"]
        v = v.view(B, T, KV, D)
        cos, sin = ctx["rope"]
        q, k = g.rotate(rms_norm(q), cos, sin), g.rotate(rms_norm(k), cos, sin)
        gain = g.q_gain[c].to(q.dtype)  # (H, 1) or (H, 2): rope / nope dims
        rd = g.rope_dims
        q = torch.cat((q[..., :rd] * gain[:, :1], q[..., rd:] * gain[:, -1:]), -1) if gain.size(1) == 2 else q * gain
        y = attention(q.to(v.dtype), k.to(v.dtype), v, ctx.get("doc"), cfg.attn_backend != "sdpa")
        if self.xsa:  # drop the part of each head's output along its own token's value direction
            vn = F.normalize(v, dim=-1).unsqueeze(3)
            yg = y.view(B, T, KV, H // KV, D)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)
        if cfg.attn_gate != "none":
            gin = u if cfg.attn_gate == "dense" else u[..., : cfg.gate_window]
            z = linear(gin, self.attn_gate_w)
            gate = 2 * torch.sigmoid(z) if cfg.attn_gate == "out2" else torch.sigmoid(cfg.attn_gate_scale * z)
            y = y * gate.unsqueeze(-1).to(y.dtype)
        return self.attn_scale.to(x.dtype) * linear(y.reshape(B, T, H * D), g.mat(g.qo_bank, U + c, "attn"), pre + "proj.weight")

    def mlp(self, g: "GPT", x: Tensor) -> Tensor:
        c, cfg = self.core, g.cfg
        names = (f"blocks.{c}.mlp.fc.weight", f"blocks.{c}.mlp.proj.weight")
        fused = cfg.fused_mlp and CAPTURE is None and DELTA is None  # calibration and LoRA hooks see the eager matmuls
        h = kernels.mlp(self.ln * rms_norm(x), g.mat(g.mlp_up_bank, c, "mlp"), g.mat(g.mlp_down_bank, c, "mlp"), cfg.mlp_act,
                        cfg.mlp_leaky_slope, fused, lambda t, w, j: linear(t, w, names[j]))
        return self.mlp_scale.to(x.dtype) * h

    def forward(self, g: "GPT", x: Tensor, x0: Tensor, ctx: dict) -> Tensor:
        x = self.mix(x, x0)
        if self.parallel and g.cfg.parallel_mode == "gptj":  # one stream, both branches read the same input
            return x + self.attn(g, x, ctx) + self.mlp(g, x)
        x = x + self.attn(g, x, ctx)
        return x + self.mlp(g, x)

    def lanes(self, g: "GPT", l0: Tensor, l1: Tensor, x0: Tensor, ctx: dict) -> tuple[Tensor, Tensor]:
        if g.cfg.parallel_mode == "lanes":  # PR #1334: each lane only ever sees its own sublayer
            a = self.mix(l0, x0)
            return a + self.attn(g, a, ctx), l1 + self.mlp(g, l1)
        A, M = self.attn(g, self.mix(l0, x0), ctx), self.mlp(g, l1)  # SOTA: learned routing
        r, P = g.parallel_resid_lambdas[self.i].to(A.dtype), g.parallel_post_lambdas[self.i].to(A.dtype)
        return r[0] * l0 + P[0, 0] * A + P[1, 0] * M, r[1] * l1 + P[0, 1] * A + P[1, 1] * M

class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        if cfg.fused_ce or cfg.fused_mlp:  # import triton now: torch.compile(fullgraph) cannot trace the import
            kernels.load()
        d, V, L = cfg.model_dim, cfg.vocab_size, cfg.num_layers
        U = self.n_cores = cfg.num_cores or L
        self.head_dim = D = d // cfg.num_heads
        kv, hid = cfg.num_kv_heads * D, int(cfg.mlp_mult * d)
        self.rope_dims = cfg.rope_dims or D
        self.tok_emb = nn.Embedding(V, d)
        self.qo_bank = nn.Parameter(torch.empty(2 * U, d, d))  # [Q_0..Q_U-1, O_0..O_U-1]
        self.kv_bank = nn.Parameter(torch.empty(2 * U, kv, d))  # [K..., V...]
        self.mlp_up_bank = nn.Parameter(torch.empty(U, hid, d))
        self.mlp_down_bank = nn.Parameter(torch.empty(U, d, hid))
        self.q_gain = nn.Parameter(torch.full((U, cfg.num_heads, 2 if cfg.qk_gain_split else 1), cfg.qk_gain_init))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.looping = False
        orders = [layer_order(cfg, False), layer_order(cfg, True)]
        self.n_skips = cfg.num_skips if cfg.num_skips >= 0 else max(min(len(o) // 2, len(o) - len(o) // 2) for o in orders)
        self.skip_weights = nn.Parameter(torch.ones(self.n_skips, d))
        if cfg.skip_gates:
            self.skip_gates = nn.Parameter(torch.zeros(self.n_skips, d))
        if cfg.embed_scale:
            self.embed_scale = nn.Parameter(torch.ones(d))
        if cfg.smear == "v2":
            self.smear_w = nn.Parameter(torch.zeros(d))
        elif cfg.smear == "v3":
            self.smear_w = nn.Parameter(torch.zeros(1, cfg.gate_window))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.bigram_buckets:
            self.bigram = nn.Module()
            self.bigram.table = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim)
            self.bigram.proj = nn.Parameter(torch.zeros(d, cfg.bigram_dim))
            self.bigram.scale = nn.Parameter(torch.tensor(0.05))
        self.ve_layers = [int(s) for s in cfg.ve_layers.split(",") if s.strip()]
        if self.ve_layers:
            self.ve = nn.Module()
            self.ve.table = nn.Embedding(V, cfg.ve_dim)
            self.ve.proj = nn.Parameter(torch.zeros(kv, cfg.ve_dim))
            self.ve.scale = nn.Parameter(torch.tensor(0.1))
            self.ve_layer_scales = nn.Parameter(torch.ones(len(self.ve_layers)))
        if cfg.parallel_start >= 0 and cfg.parallel_mode == "two_lane":
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        elif cfg.parallel_start >= 0 and cfg.parallel_mode == "lanes":
            self.lane_merge = nn.Parameter(torch.tensor(0.5))
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.zeros(V, d))
        self.register_buffer("qat_mix", torch.zeros(()), persistent=False)
        self.register_buffer("core_uses", torch.bincount(torch.arange(L) % U, minlength=U).float(), persistent=False)
        self.reset_parameters()
        if cfg.storage_dtypes == "official":  # records: init in fp32, model.bfloat16(), then all but the embedding tables back to fp32
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    m.bfloat16()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg, U = self.cfg, self.n_cores
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0)
        # Q, K, V, up: orthogonal (PR #65+) or nn.Linear's default U(+-1/sqrt(fan_in)); O and down start at zero
        for bank, n in ((self.qo_bank, U), (self.kv_bank, 2 * U), (self.mlp_up_bank, U)):
            for j in range(n):
                nn.init.orthogonal_(bank[j]) if cfg.ortho_init else nn.init.uniform_(bank[j], -bank.size(2) ** -0.5, bank.size(2) ** -0.5)
        self.qo_bank[U:].zero_()
        self.mlp_down_bank.zero_()
        if cfg.bigram_buckets:
            self.bigram.table.weight.zero_()
            self.init_proj(self.bigram.proj)
        if self.ve_layers:
            nn.init.normal_(self.ve.table.weight, std=0.01)
            self.init_proj(self.ve.proj)

    @torch.no_grad()
    def init_proj(self, w: Tensor) -> None:
        """The records' rule for names ending in '.proj' (attention/MLP proj are zero anyway): orthogonal,
        times 1/sqrt(2L) in the PR #162..#573 scripts (PR #473: unscaled); PR #1550's VE projection stayed zero."""
        if not self.cfg.ortho_init or self.cfg.proj_init == "zero":
            w.zero_()
        else:
            nn.init.orthogonal_(w).mul_(1 / math.sqrt(2 * self.cfg.num_layers) if self.cfg.proj_init == "ortho_scaled" else 1.0)

    @torch.no_grad()
    def mean_core_grads(self) -> None:
        """Every per-core tensor (the four bank slices and q_gain) divided by its core's number of uses."""
        for p in (self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank, self.q_gain):
            if p.grad is not None:
                p.grad.div_(self.core_uses.repeat(p.size(0) // self.n_cores).view(-1, *[1] * (p.ndim - 1)))

    def mat(self, bank: Tensor, j: int, group: str) -> Tensor:
        """A bank slice, seen through the late-QAT fake quantizer when qat is configured."""
        cfg = self.cfg
        if not cfg.qat:
            return bank[j]
        bits, k = (cfg.quant_bits_attn, cfg.sdclip_k_attn) if group == "attn" else (cfg.quant_bits_mlp, cfg.sdclip_k_mlp)
        return fake_quant(bank[j], bits, "sdclip" if cfg.quant_clip == "sdclip" else "max", k, self.qat_mix, cfg.quant_scale_rule)

    def rope(self, T: int, device) -> tuple[Tensor, Tensor]:
        # cos/sin are rebuilt per call (folded by compile): a cache filled under inference_mode would
        # later break backward through it (the TTT pitfall). NTK rescaling is keyed to the configured
        # length, never to a hard-coded 1024 or a packed row.
        rd, base, ntk = self.rope_dims, self.cfg.rope_base, self.cfg.rope_ntk_len
        if ntk and T > ntk:
            base = base * (T / ntk) ** (rd / (rd - 2))
        inv = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))  # the records' rounding, bit for bit
        f = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv)
        if self.cfg.storage_dtypes == "official" and not (ntk and T > ntk):  # the cast bf16 inv_freq buffer; positions take its
            f = torch.outer(torch.arange(T, dtype=torch.bfloat16, device=device), inv.bfloat16())  # dtype (an NTK table is fresh fp32)
        return f.cos()[None, :, None, :], f.sin()[None, :, None, :]

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rd = self.rope_dims
        h = rd // 2
        x1, x2, rest = x[..., :h], x[..., h:rd], x[..., rd:]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), -1)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embedding (+ BigramHash, SmearGate) -> x0. The BOS mask keeps every previous-token
        term from crossing a document start in a packed stream."""
        cfg = self.cfg
        x = self.tok_emb(ids)
        keep = (ids != cfg.bos_id).unsqueeze(-1) if cfg.bos_mask else torch.ones_like(ids, dtype=torch.bool).unsqueeze(-1)
        if cfg.embed_scale:
            x = x * self.embed_scale
        if cfg.bigram_buckets:
            B = cfg.bigram_buckets
            cur, prev = ids.int(), F.pad(ids[:, :-1], (1, 0)).int()
            h = ((36313 * cur) ^ (27191 * prev)) % (B - 1)
            h[:, 0] = B - 1  # reserved bucket: no previous token
            h = torch.where(keep.squeeze(-1), h, B - 1)
            x = x + self.bigram.scale.to(x.dtype) * linear(self.bigram.table(h.long()), self.bigram.proj)
        if cfg.smear == "v3":  # input-dependent, additive, identity at init
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
            gate = torch.sigmoid(linear(x[..., : cfg.gate_window], self.smear_w))
            x = x + self.smear_lambda.to(x.dtype) * gate * prev * keep
        x = rms_norm(x)
        if cfg.smear == "v2":
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
            x = x + keep * torch.sigmoid(self.smear_w).to(x.dtype) * (prev - x)
        return x

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Logits (B,T,V) when target_ids is None, else cross-entropy (mean, or per token with reduction='none')."""
        cfg = self.cfg
        x = x0 = self.embed(input_ids)
        ctx = {"rope": self.rope(input_ids.size(1), input_ids.device)}
        if cfg.doc_attention:
            ctx["doc"] = torch.cumsum(input_ids == cfg.bos_id, dim=1)
        if self.ve_layers:
            ctx["ve"] = self.ve.scale.to(x.dtype) * linear(self.ve.table(input_ids), self.ve.proj)
        order = layer_order(cfg, self.looping)
        n_enc, skips, lanes = len(order) // 2, [], None
        for pos, i in enumerate(order):
            blk = self.blocks[i]
            two = blk.parallel and cfg.parallel_mode != "gptj"
            lanes = lanes or ([x, x] if two and cfg.lane_skip == "lane0" else None)  # both lanes start from the stream
            if pos >= n_enc and pos - n_enc < self.n_skips and skips:  # U-Net: mirrored encoder output (LIFO)
                k, s = pos - n_enc, skips.pop() * self.skip_weights[pos - n_enc].to(x.dtype)
                cur = lanes[0] if lanes else x  # with lanes, the skip feeds the attention lane only
                cur = torch.lerp(s, cur, torch.sigmoid(self.skip_gates[k]).to(x.dtype)) if cfg.skip_gates else cur + s
                lanes, x = ([cur, lanes[1]], x) if lanes else (lanes, cur)
            lanes = lanes or ([x, x] if two else None)  # lane_skip=stream: the lanes split after the skip
            if two:
                lanes = list(blk.lanes(self, lanes[0], lanes[1], x0, ctx))
            else:
                x = blk(self, x, x0, ctx)
            if pos < n_enc:
                skips.append(x)
        if lanes is not None:
            x = (lanes[0] + lanes[1]) / 2 if cfg.parallel_mode == "two_lane" else torch.lerp(lanes[1], lanes[0], self.lane_merge.to(x.dtype))
        x = rms_norm(x)
        logits = linear(x, self.tok_emb.weight if self.lm_head is None else self.lm_head, "tok_emb.weight" if self.lm_head is None else "lm_head")
        if target_ids is None:
            return kernels.softcap(logits, cfg.logit_softcap)
        return kernels.softcap_ce(logits, target_ids, cfg.logit_softcap, reduction, cfg.fused_ce)

BANKS = {"qo_bank": ("attn.c_q", "attn.proj"), "kv_bank": ("attn.c_k", "attn.c_v"), "mlp_up_bank": ("mlp.fc",), "mlp_down_bank": ("mlp.proj",)}

def unbank(state: dict) -> dict:
    """Per-core 2-D matrices under the classic names (blocks.{core}.attn.c_q.weight, ...): what
    quantization, GPTQ and name-based selection see."""
    out = {k: v for k, v in state.items() if k not in BANKS}
    for name, parts in BANKS.items():
        t, n = state[name], state[name].size(0) // len(parts)
        for j, part in enumerate(parts):
            for c in range(n):
                out[f"blocks.{c}.{part}.weight"] = t[j * n + c]
    return out

def rebank(state: dict) -> dict:
    out = {k: v for k, v in state.items() if not (k.startswith("blocks.") and k.endswith(".weight"))}
    for name, parts in BANKS.items():
        n = sum(1 for k in state if k.endswith(f".{parts[0]}.weight"))
        out[name] = torch.stack([state[f"blocks.{c}.{part}.weight"] for part in parts for c in range(n)])
    return out

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

def flops_per_token(cfg: Config, model: GPT, looping: bool) -> float:
    """Training FLOPs per token: 6 x matmul weights applied per token (shared cores count once per
    pass, the output head included) + causal attention 6 * T * d per layer pass (QK^T and AV over
    seq_len/2 keys on average, forward + backward), over the layer schedule with looping off or on."""
    passes = layer_order(cfg, looping)
    per_core = sum(b[0].numel() for b in (model.qo_bank, model.kv_bank)) * 2 + model.mlp_up_bank[0].numel() * 2
    return 6.0 * (len(passes) * per_core + cfg.vocab_size * cfg.model_dim) + 6.0 * len(passes) * cfg.train_seq_len * cfg.model_dim

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU

def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

# -----------------------------------------------------------------------------
# OPTIMIZERS: Parallel Muon over the banks, AdamW for the rest, schedules, weight averaging

NS5 = ((3.4445, -4.7750, 2.0315),)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462), (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393), (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

def orthogonalize(G: Tensor, steps: int, coeffs: str = "ns5", eps: float = 1e-7) -> Tensor:
    """Approximate polar factor of every matrix in G (..., rows, cols), in bf16: quintic Newton-Schulz
    or Polar Express (one tuple per step; more than 5 steps still runs its 5 tuples, as the records did)."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    tr = G.size(-2) > G.size(-1)
    X = X.mT if tr else X
    for a, b, c in (NS5 * steps if coeffs == "ns5" else POLAR_EXPRESS[:steps]):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tr else X

def param_groups(model: nn.Module, cfg: Config) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """embed (embedding tables), head, bank (3-D Muon banks), matrix (other 2-D -> Muon), scalar."""
    control = [s for s in cfg.control_tensor_name_patterns.split(",") if s]
    to_adam = [s for s in cfg.adam_matrix_patterns.split(",") if s]
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {k: [] for k in ("embed", "head", "bank", "matrix", "scalar")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = ("embed" if id(p) in tables else "head" if name == "lm_head" else "bank" if name in BANKS else
             "matrix" if p.ndim == 2 and not any(c in name for c in control + to_adam) else "scalar")
        groups[k].append((name, p))
    return groups

def _all_gather(out: Tensor, inp: Tensor, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    return fn(out, inp, async_op=async_op)

def _reduce_scatter(out: Tensor, inp: Tensor, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, async_op=async_op)

class Optimizer:
    """Owns every parameter and its communication (no DDP). After backward, bank gradients are
    padded to a multiple of the world size and reduce-scattered, so each rank owns whole matrices and
    runs Muon on them alone; the other gradients go in one flat all-reduce and AdamW steps while the
    scatters are in flight; then each rank all-gathers the orthogonalised bank updates. At world size 1
    the same code runs with no collective."""

    def __init__(self, model: "GPT", cfg: Config, rt: Runtime):
        self.cfg, self.rt, self.model = cfg, rt, model
        G = param_groups(model, cfg)
        kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=rt.device.type == "cuda")
        embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
        spec = (("embed", embed_lr, cfg.embed_wd), ("head", cfg.head_lr, 0.0), ("scalar", cfg.scalar_lr, cfg.adam_wd))
        self.adams = [torch.optim.AdamW([{"params": [p for _, p in G[k]], "lr": lr, "base_lr": lr}], weight_decay=wd, **kw)
                      for k, lr, wd in spec if G[k]]
        self.banks, self.mats = G["bank"], G["matrix"]
        self.replicated = [p for k in ("embed", "head", "scalar", "matrix") for _, p in G[k]]
        dt = torch.bfloat16 if cfg.muon_momentum_dtype == "bf16" else torch.float32
        W = rt.world_size
        self.mom = {n: torch.zeros(-(-p.size(0) // W), *p.shape[1:], device=p.device, dtype=dt) for n, p in self.banks}
        self.mom.update({n: torch.zeros_like(p, dtype=dt) for n, p in self.mats})
        self.comm_dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32  # gloo lacks bf16
        self.grad_dtype = torch.bfloat16 if cfg.muon_grad_dtype == "bf16" else torch.float32
        self.ns = orthogonalize
        self.check(model)

    def check(self, model: nn.Module) -> None:
        """Every trainable parameter is stepped by exactly one optimizer (a SmearGate that no group
        collected was an exact no-op in a merged record)."""
        mine = [id(p) for o in self.adams for g in o.param_groups for p in g["params"]]
        mine += [id(p) for _, p in self.banks + self.mats]
        want = [id(p) for p in model.parameters() if p.requires_grad]
        if len(set(mine)) != len(mine) or set(mine) != set(want):
            names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in set(mine)]
            raise RuntimeError(f"optimizer groups must cover every trainable parameter exactly once; missing: {names}")

    def _muon(self, g: Tensor, buf: Tensor, momentum: float) -> Tensor:
        g = g.to(buf.dtype)  # a bf16 buffer (banked records) takes a bf16 gradient and sums Nesterov in bf16
        buf.mul_(momentum).add_(g)
        u = g.add(buf, alpha=momentum)  # Nesterov
        if self.cfg.muon_row_norm:  # MuonEq-R, norms in fp32
            u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
        u = self.ns(u, self.cfg.muon_backend_steps, self.cfg.muon_ns)
        return u * max(1.0, u.size(-2) / u.size(-1)) ** 0.5

    def _apply(self, name: str, p: Tensor, u: Tensor, lr: float) -> None:
        wd = self.cfg.muon_wd_mlp if "mlp" in name and self.cfg.muon_wd_mlp >= 0 else self.cfg.muon_wd
        if wd:  # decoupled, scaled by the scheduled LR
            p.mul_(1 - lr * wd)
        p.add_(u.to(p.dtype), alpha=-lr)

    def _landed(self, name, p, shard, work):
        if work is not None:  # reduce-scatter sums; Muon wants the mean
            work.wait()
            shard = shard.div_(self.rt.world_size).float()  # a bf16 mean (muon_grad_dtype) is rounded once, then fp32
        return name, p, shard, None

    @torch.no_grad()
    def step(self, lr_mul: float, momentum: float) -> None:
        cfg, W = self.cfg, self.rt.world_size
        if cfg.core_grad_scale:  # PR #526: a core shared by k layers gets the mean, not the sum, of their grads
            self.model.mean_core_grads()
        if cfg.grad_clip_norm > 0 and cfg.grad_clip_rule == "local":  # the mean of per-rank-clipped gradients
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], cfg.grad_clip_norm)
        jobs = []
        for name, p in sorted(self.banks, key=lambda t: -t[1].numel()):  # largest first
            n_pad = -(-p.size(0) // W) * W
            if W == 1:
                jobs.append((name, p, p.grad, None))
                continue
            g = torch.cat([p.grad, p.grad.new_zeros(n_pad - p.size(0), *p.shape[1:])]) if n_pad > p.size(0) else p.grad
            g = g.to(self.grad_dtype).contiguous()
            shard = g.new_empty(n_pad // W, *p.shape[1:])
            jobs.append((name, p, shard, _reduce_scatter(shard, g, async_op=True)))
        reps = [p for p in self.replicated if p.grad is not None]
        if W > 1 and reps:
            flat = torch.cat([p.grad.reshape(-1) for p in reps])
            all_reduce_(flat).div_(W)
            torch._foreach_copy_([p.grad for p in reps], [f.view_as(p) for f, p in zip(flat.split([p.numel() for p in reps]), reps)])
        if cfg.grad_clip_norm > 0 and cfg.grad_clip_rule == "global":  # the norm of the reduced gradient
            jobs = [self._landed(*j) for j in jobs]
            sq = torch.zeros((), device=self.rt.device)
            for *_, shard, _ in jobs:
                sq += shard.float().square().sum()
            all_reduce_(sq)
            for p in reps:
                sq += p.grad.float().square().sum()
            coef = (cfg.grad_clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([s for *_, s, _ in jobs] + [p.grad for p in reps], coef)
        for opt in self.adams:
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * lr_mul
            opt.step()
        lr = cfg.matrix_lr * lr_mul
        for name, p in self.mats:
            if p.grad is not None:
                self._apply(name, p, self._muon(p.grad, self.mom[name], momentum), lr)
        gathers = []
        for job in jobs:
            name, p, shard, _ = self._landed(*job)
            u = self._muon(shard, self.mom[name], momentum)
            if W == 1:
                self._apply(name, p, u, lr)
                continue
            full = torch.empty(W * u.size(0), *u.shape[1:], device=u.device, dtype=self.comm_dtype)
            gathers.append((name, p, full, _all_gather(full, u.to(self.comm_dtype).contiguous(), async_op=True)))
        for name, p, full, work in gathers:
            work.wait()
            self._apply(name, p, full[: p.size(0)], lr)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """World-size independent: bank momentum is gathered from the owning ranks (a collective)."""
        mom = {}
        for name, p in self.banks:
            buf = self.mom[name]
            if self.rt.world_size > 1:
                full = buf.new_empty(self.rt.world_size * buf.size(0), *buf.shape[1:]).float()
                _all_gather(full, buf.float())
                buf = full
            mom[name] = buf[: p.size(0)].detach().cpu().clone()
        mom.update({n: self.mom[n].detach().cpu().clone() for n, _ in self.mats})
        return {"adam": [o.state_dict() for o in self.adams], "momentum": mom}

    def load_state_dict(self, s: dict) -> None:
        for o, st in zip(self.adams, s["adam"], strict=True):
            o.load_state_dict(st)
        r = self.rt.rank
        for name, p in self.banks:
            n = self.mom[name].size(0)
            full = torch.zeros(n * self.rt.world_size, *p.shape[1:])
            full[: p.size(0)] = s["momentum"][name]
            self.mom[name].copy_(full[r * n : (r + 1) * n])
        for name, _ in self.mats:
            self.mom[name].copy_(s["momentum"][name])

def train_budget_ms(cfg: Config) -> float:
    return 1000.0 * (cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds)

def progress(cfg: Config, step: int, elapsed_ms: float) -> float:
    """Fraction of training done: of the wallclock budget when capped, else of the step budget."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / train_budget_ms(cfg)
    return step / max(cfg.iterations, 1)

def lr_multiplier(cfg: Config, step: int, elapsed_ms: float) -> float:
    """iter_warmdown: linear to 0 over the last warmdown_iters steps, converted to wallclock with the
    measured step time when capped. frac_warmdown: linear over the last warmdown_frac of training,
    floored at min_lr. cosine: from 1 to min_lr."""
    if cfg.lr_schedule == "iter_warmdown":
        if cfg.warmdown_iters <= 0:
            return 1.0
        if cfg.max_wallclock_seconds <= 0:
            start = max(cfg.iterations - cfg.warmdown_iters, 0)
            return max((cfg.iterations - step) / cfg.warmdown_iters, 0.0) if step >= start else 1.0
        warmdown_ms = cfg.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(train_budget_ms(cfg) - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    f = min(progress(cfg, step, elapsed_ms), 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * f))
    if cfg.warmdown_frac <= 0 or f < 1 - cfg.warmdown_frac:
        return 1.0
    return max((1 - f) / cfg.warmdown_frac, cfg.min_lr)

def muon_momentum(cfg: Config, step: int, elapsed_ms: float = 0.0, lr_mul: float = 1.0) -> float:
    frac = (min(progress(cfg, step, elapsed_ms) / cfg.muon_momentum_warmup_frac, 1.0) if cfg.muon_momentum_warmup_frac > 0 else
            min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0)
    mu = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
    if cfg.muon_momentum_warmdown > 0:  # PR #1812: b = 1 until the warmdown, so only the decay phase moves
        b = max(lr_mul, 0.25)
        mu = b * mu + (1 - b) * cfg.muon_momentum_warmdown
    return mu

class WeightAverage:
    """EMA: fp32 shadow of every parameter, ema = d*ema + (1-d)*w after each step. SWA: uniform mean
    of snapshots taken every swa_every steps once the LR multiplier is below swa_lr_threshold. The
    chosen average really replaces the weights before quantization (the records' SWA never did)."""

    def __init__(self, model: nn.Module, cfg: Config):
        self.cfg, self.kind, self.count = cfg, cfg.weight_average, 0
        self.params = [p for p in model.parameters()]
        init = (lambda p: p.detach().float().clone()) if self.kind == "ema" else (lambda p: torch.zeros_like(p, dtype=torch.float32))
        self.avg = [init(p) for p in self.params] if self.kind != "none" else []

    @torch.no_grad()
    def update(self, step: int, lr_mul: float) -> None:
        if self.kind == "ema":
            torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params], 1 - self.cfg.ema_decay)
        elif self.kind == "swa" and step % self.cfg.swa_every == 0 and lr_mul < self.cfg.swa_lr_threshold:
            torch._foreach_add_(self.avg, [p.detach().float() for p in self.params])
            self.count += 1

    @torch.no_grad()
    def apply(self) -> str:
        n = 1 if self.kind == "ema" else self.count
        if self.kind == "none" or not n:
            return "none (live weights)" + (" - swa took no snapshot" if self.kind == "swa" else "")
        for p, a in zip(self.params, self.avg):
            p.copy_((a / n).to(p.dtype))
        return f"ema decay={self.cfg.ema_decay}" if self.kind == "ema" else f"swa snapshots={self.count} every={self.cfg.swa_every} below_lr_mul={self.cfg.swa_lr_threshold}"

    def state_dict(self) -> dict:
        return {"avg": [a.detach().cpu().clone() for a in self.avg], "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        for a, b in zip(self.avg, s["avg"], strict=True):
            a.copy_(b)
        self.count = int(s["count"])

# -----------------------------------------------------------------------------
# EVALUATION AND LOGGING

def autocast(cfg: Config, device: torch.device):
    dtype = torch.bfloat16 if cfg.autocast_dtype == "bf16" else torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

@torch.no_grad()
def eval_val(cfg: Config, model: nn.Module, rt: Runtime, val_tokens: Tensor, tgt_bytes: Tensor) -> tuple[float, float]:
    """Baseline eval: non-overlapping windows of train_seq_len, each scored from a fresh context,
    windows split contiguously across ranks, sums in float64 and all-reduced. tgt_bytes[p] = bytes of target p."""
    T = cfg.train_seq_len
    n_seqs = (val_tokens.numel() - 1) // T
    lo, hi = n_seqs * rt.rank // rt.world_size, n_seqs * (rt.rank + 1) // rt.world_size
    batch = max(cfg.val_batch_size // (rt.world_size * rt.grad_accum) // T, 1)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nll, tokens, bytes
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(lo, hi, batch):
            e = min(s + batch, hi)
            chunk = val_tokens[s * T : e * T + 1].to(rt.device, torch.int64, non_blocking=True)
            x, y = chunk[:-1].view(-1, T), chunk[1:].view(-1, T)
            with autocast(cfg, rt.device):
                nll = model(x, y, reduction="none")
            sums[0] += nll.double().sum()
            sums[1] += y.numel()
            sums[2] += tgt_bytes[s * T + 1 : e * T + 1].to(rt.device, torch.float64).sum()
    model.train(was_training)
    all_reduce_(sums)
    nll, ntok, nbytes = sums.tolist()
    return nll / ntok, bits_per_byte(nll, nbytes)

class Logger:
    """Rank 0 writes the console and logs/<run_id>.txt; an existing log is never overwritten."""

    def __init__(self, rt: Runtime, run_id: str, append: bool = False):
        self.rt, self.path = rt, Path("logs") / f"{run_id}.txt"
        if rt.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not append:
                raise ValueError(f"{self.path} already exists; choose another RUN_ID (or --resume to continue that run)")
            self.fh = open(self.path, "a", encoding="utf-8")

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if self.rt.is_main:
            print(msg, flush=True) if console else None
            print(msg, file=self.fh, flush=True)

def log_provenance(log: Logger, cfg: Config, sources: dict) -> dict[str, str]:
    """Log the code that runs (read once: the code bytes are counted from these same texts)."""
    texts = {n: (HERE / n).read_bytes().decode("utf-8") for n in CODE_FILES if (HERE / n).is_file()}
    for name, text in texts.items():
        log(f"# ===== source: {name} =====\n{text}", console=False)
    log("=" * 100, console=False)
    log(f"Running Python {sys.version.split()[0]} on {platform.platform()}", console=False)
    log(f"Running PyTorch {torch.__version__} cuda:{torch.version.cuda}", console=False)
    if torch.cuda.is_available():
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            smi = "nvidia-smi unavailable"
        log(smi, console=False)
    log("=" * 100, console=False)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    log(f"hardware:{f'{gpus}x{torch.cuda.get_device_name(0)}' if gpus else 'cpu'} world_size:{os.environ.get('WORLD_SIZE', '1')}")
    log(f"argv:{' '.join(sys.argv)}")
    log(f"config:{json.dumps(asdict(cfg), sort_keys=True)}", console=False)
    if sources:
        log("config_sources:" + " ".join(f"{k}={v}" for k, v in sorted(sources.items())), console=False)
    kinds = ["env" if v.startswith("env") else v for v in sources.values()]
    log(f"config_summary: {', '.join(f'{kinds.count(k)} keys from {k}' for k in sorted(set(kinds))) or 'all defaults'}; "
        f"the resolved config is in {log.path}")
    return texts

# -----------------------------------------------------------------------------
# TRAINING: a Run bundles the state; checkpoints hold plain tensors and primitives only
# (torch.load(weights_only=True) can read them, nothing in them can execute)

@dataclass
class Run:
    cfg: Config
    rt: Runtime
    log: Logger
    base: GPT  # the eager module: state, eval-time toggles
    model: nn.Module  # what runs the steps (compiled on CUDA)
    opt: Optimizer
    avg: WeightAverage
    loader: DistributedTokenLoader
    out_dir: Path
    sources: dict  # the code files as logged at start
    dataset: dict  # dataset_fingerprint of the val shards and tokenizer: the artifact records it
    step: int = 0
    train_ms: float = 0.0

def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)

def save_checkpoint(r: Run) -> None:
    opt = r.opt.state_dict()  # a collective: every rank calls it
    if not r.rt.is_main:
        return
    r.out_dir.mkdir(parents=True, exist_ok=True)
    path = r.out_dir / f"ckpt_step{r.step:06d}.pt"
    atomic_save({"format": "pgolf-ckpt/2", "step": r.step, "training_time_ms": r.train_ms, "config": asdict(r.cfg),
                 "model": {k: v.detach().cpu() for k, v in r.base.state_dict().items()}, "opt": opt,
                 "avg": r.avg.state_dict(), "looping": r.base.looping, "loader": r.loader.state(), "banks": BANKS}, path)
    old = sorted(r.out_dir.glob("ckpt_step*.pt"))
    for f in old[: max(len(old) - r.cfg.keep_checkpoints, 0)]:
        f.unlink()
    r.log(f"checkpoint:{path} step:{r.step}")

def load_checkpoint(path: str) -> dict:
    ck = quantize.load_torch(path, "checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != "pgolf-ckpt/2":
        raise ValueError(f"{path} is not a checkpoint written by this train_gpt.py")
    return ck

def restore_checkpoint(r: Run, ck: dict) -> None:
    try:
        r.base.load_state_dict(ck["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint does not fit this model config ({str(e).splitlines()[0]}); resume with the run's config") from None
    r.opt.load_state_dict(ck["opt"])
    r.avg.load_state_dict(ck["avg"])
    r.loader.load_state(ck["loader"])
    r.base.looping, r.step, r.train_ms = bool(ck["looping"]), int(ck["step"]), float(ck["training_time_ms"])

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def train_step(r: Run, lr_mul: float, momentum: float) -> Tensor:
    """One optimizer step over grad_accum micro-batches; returns this rank's mean loss (on device)."""
    loss_sum = torch.zeros((), device=r.rt.device)
    for _ in range(r.rt.grad_accum):
        x, y = r.loader.next_batch(r.cfg.train_batch_tokens, r.cfg.train_seq_len)
        with autocast(r.cfg, r.rt.device):
            loss = r.model(x, y)
        (loss / r.rt.grad_accum).backward()
        loss_sum += loss.detach()
    r.opt.step(lr_mul, momentum)
    r.opt.zero_grad()
    return loss_sum / r.rt.grad_accum

def warmup(r: Run, fresh_loader) -> None:
    """Compile priming on real batches, for every graph the run will need (looping off and on), then
    weights, optimizer state and data position go back to the start: none of it counts as training
    (Muon's momentum stays when warmup_revert_momentum is off, as in PR #1855)."""
    cfg = r.cfg
    if cfg.warmup_steps <= 0:
        return
    init_model = copy.deepcopy(r.base.state_dict())
    init_opt = copy.deepcopy(r.opt.state_dict())
    for looping in [False, True] if cfg.num_loops > 0 else [False]:
        r.base.looping = looping
        for s in range(cfg.warmup_steps):
            train_step(r, 1.0, cfg.muon_momentum_warmup_start)
            if cfg.warmup_steps <= 20 or (s + 1) % 10 == 0 or s + 1 == cfg.warmup_steps:
                r.log(f"warmup_step:{s + 1}/{cfg.warmup_steps}" + (" looping:on" if looping else ""))
    r.base.looping = False
    kept = {} if cfg.warmup_revert_momentum else {n: b.clone() for n, b in r.opt.mom.items()}
    r.base.load_state_dict(init_model)
    r.opt.load_state_dict(init_opt)
    for n, b in kept.items():
        r.opt.mom[n].copy_(b)
    r.loader = fresh_loader()

def artifact_plan(cfg: Config, model: nn.Module, texts: dict | None = None) -> list[str]:
    c = asdict(cfg)
    code = quantize.code_size(HERE, cfg.code_packed, texts, cfg.code_packer)[0]
    p = quantize.plan(quantize.param_groups_of(unbank(model.state_dict()), c), c, code)
    return [f"artifact_plan: {line}" for line in quantize.format_plan(p).splitlines()]

def run_id_default(cfg_path: str | None, seed: int) -> str:
    stem = Path(cfg_path).stem if cfg_path else "run"
    return f"{stem}_seed{seed}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"

def main(argv: list[str]) -> None:
    opts, overrides = parse_cli(argv)
    cfg, sources = load_config(opts["config"], overrides)
    if opts["dry_run"]:
        model = GPT(cfg)
        print(f"model_params:{count_params(model)}")
        print(f"config:{json.dumps(asdict(cfg), sort_keys=True)}")
        print("\n".join(artifact_plan(cfg, model)))
        return
    ck = load_checkpoint(opts["resume"]) if opts["resume"] else None
    if not cfg.run_id:
        cfg.run_id = ck["config"]["run_id"] if ck else run_id_default(opts["config"], cfg.seed)
    rt = init_runtime(cfg)
    if rt.distributed:  # every rank must agree on a generated run id
        obj = [cfg.run_id]
        dist.broadcast_object_list(obj, src=0)
        cfg.run_id = obj[0]
    out_dir = Path(cfg.out_dir or Path("runs") / cfg.run_id)
    check_outputs(["logs", out_dir] if rt.is_main else [])  # before any data is read or anything compiled
    log = Logger(rt, cfg.run_id, append=ck is not None)
    if ck is not None:
        log(f"resume:{opts['resume']} step:{ck['step']}")
    texts = log_provenance(log, cfg, sources)
    seed_everything(cfg.seed)

    # tokenizer, data integrity, bytes per val target
    sp = load_tokenizer(cfg)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={cfg.tokenizer_path}")
    train_files, val_files = shard_files(cfg.data_path, "train"), shard_files(cfg.data_path, "val")
    val_stream = load_val_stream(val_files, cfg.vocab_size)
    for line in check_dataset(cfg, val_stream, train_files, int(sp.bos_id())):
        log(line)
    val_tokens = torch.from_numpy(usable_val(val_stream, cfg.train_seq_len).astype(np.int32))  # int64 per batch
    tgt_bytes = torch.from_numpy(val_target_bytes(cfg, sp, val_stream)[: val_tokens.numel()])
    log(f"train_loader:dataset:{Path(cfg.data_path).name} train_shards:{len(train_files)}")
    log(f"val_loader:shards pattern={Path(cfg.data_path) / 'fineweb_val_*.bin'} tokens:{val_tokens.numel() - 1}")
    log(f"val_bytes:{int(tgt_bytes[1:].sum())} from:{'caseops_sidecar (original text)' if cfg.caseops_enabled else 'tokenizer_luts'}")
    if cfg.train_batch_tokens % (cfg.virtual_world_size * cfg.train_seq_len):
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} must be a multiple of virtual_world_size*train_seq_len")

    # model, optimizers, averaging
    base = GPT(cfg).to(rt.device)
    use_compile = cfg.compile and rt.device.type == "cuda"
    model = torch.compile(base, dynamic=False, fullgraph=True) if use_compile else base
    opt = Optimizer(base, cfg, rt)
    if use_compile:
        opt.ns = torch.compile(orthogonalize)
    r = Run(cfg, rt, log, base, model, opt, WeightAverage(base, cfg), make_loader(cfg, train_files, rt),
            out_dir, texts, dataset_fingerprint(val_stream, cfg.tokenizer_path))
    peak, backend = peak_flops(rt.device), attention_backend(cfg, rt.device)
    log(f"model_params:{count_params(base)}")  # <= 16 bytes/param per checkpoint (weights, optimizer, average), keep+1 at once
    check_outputs([out_dir] if rt.is_main else [], count_params(base) * (16 * cfg.keep_checkpoints + 20) + SIZE_CAP_BYTES)
    log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum} device:{rt.device} compile:{use_compile} autocast:{cfg.autocast_dtype}")
    log(f"attention_backend:{backend}" + ("" if backend == "fa3" or rt.device.type != "cuda" else
        " WARNING: FlashAttention 3 not in use on CUDA (not importable, doc_attention, or attn_backend=sdpa): expect slower steps"))
    if line := kernels.backend_line(cfg.fused_ce, cfg.fused_mlp, cfg.mlp_act, rt.device):
        log(line)
    log(f"attention_mode:{'gqa' if cfg.num_kv_heads < cfg.num_heads else 'mha'} num_heads:{cfg.num_heads} num_kv_heads:{cfg.num_kv_heads}")
    log(f"layer_schedule:{layer_order(cfg, False)}" + (f" looped:{layer_order(cfg, True)}" if cfg.num_loops else ""))
    log(f"tie_embeddings:{cfg.tie_embeddings} embed_lr:{cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr} "
        f"head_lr:{0.0 if cfg.tie_embeddings else cfg.head_lr} matrix_lr:{cfg.matrix_lr} scalar_lr:{cfg.scalar_lr}")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} train_seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
        f"warmup_steps:{cfg.warmup_steps} max_wallclock_seconds:{cfg.max_wallclock_seconds:.3f}")
    log(f"seed:{cfg.seed}")
    for line in artifact_plan(cfg, base, texts):  # the artifact budget, before any compute is spent
        log(line)
    warmup(r, lambda: make_loader(cfg, train_files, rt))
    gc.collect()
    gc.freeze()  # what lives now lives to the end: the collector skips it instead of pausing steps
    if ck is not None:
        restore_checkpoint(r, ck)
        del ck
    pre_bpb = train_loop(r, val_tokens, tgt_bytes, peak)
    if rt.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    try:
        finish(r, val_tokens, tgt_bytes, pre_bpb)
    except Exception as e:  # whatever breaks the final writes (torch.save reports a full disk as RuntimeError), the weights survive
        note = rescue(r, e)
        if isinstance(e, OSError):
            raise OSError(note) from None
        print(f"error: {note}", file=sys.stderr)
        raise

class StopVote:
    """The stop decision and schedule clock all ranks share, without a host sync in the step: the host
    waits only for the previous step (this one keeps the GPU busy), votes whether the next step would
    end past the cap, and (vote, clock) is MAX-all-reduced on the device and read one call later."""

    def __init__(self, device: torch.device):
        self.cuda, self.device, self.pending = device.type == "cuda", device, None

    def __call__(self, clock, step_ms: float, cap_ms: float) -> tuple[bool, float | None]:
        prev = self.pending
        if prev is not None and prev[1] is not None:
            prev[1].synchronize()
        now = clock()
        vote = now + (2 if self.cuda else 1) * step_ms >= cap_ms  # on CUDA this step is still running
        t = torch.tensor([float(vote), now], dtype=torch.float64, pin_memory=self.cuda).to(self.device, non_blocking=True)
        self.pending = (all_reduce_(t, dist.ReduceOp.MAX).to("cpu", non_blocking=True), torch.cuda.Event() if self.cuda else None)
        if self.cuda:
            self.pending[1].record()
        return (False, None) if prev is None else (bool(prev[0][0] > 0), float(prev[0][1]))

def train_loop(r: Run, val_tokens: Tensor, tgt_bytes: Tensor, peak: float | None) -> float:
    """Train until iterations or the wallclock budget; returns the last validation bpb."""
    cfg, rt, log = r.cfg, r.rt, r.log
    resumed_at = r.step if r.step > 0 else None  # that step's validation already ran before the crash
    cap_ms = train_budget_ms(cfg) if cfg.max_wallclock_seconds > 0 else None
    stop_after: int | None = None
    loss_acc, n_acc, window_ms, step_ms, reached = torch.zeros((), device=rt.device), 0, 0.0, 0.0, False
    vote, qat_on, elapsed = StopVote(rt.device), False, r.train_ms  # QAT restarts below its threshold on resume
    sync(rt.device)
    t0 = time.perf_counter()
    while True:
        last = r.step == cfg.iterations or (stop_after is not None and r.step >= stop_after)
        if last or (cfg.val_loss_every > 0 and r.step % cfg.val_loss_every == 0 and r.step != resumed_at):
            sync(rt.device)  # validation pauses the train clock
            r.train_ms += 1000.0 * (time.perf_counter() - t0)
            val_loss, val_bpb = eval_val(cfg, r.model, rt, val_tokens, tgt_bytes)
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"val_loss is {val_loss} at step {r.step}: training diverged; lower the learning rates")
            log(f"step:{r.step}/{cfg.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{r.train_ms:.0f}ms step_avg:{r.train_ms / max(r.step, 1):.2f}ms")
            sync(rt.device)
            t0 = time.perf_counter()
        if last:
            if stop_after is not None and r.step < cfg.iterations:
                log(f"stopping_early: wallclock_cap train_time:{r.train_ms:.0f}ms step:{r.step}/{cfg.iterations}")
            return val_bpb
        lr_mul, frac = lr_multiplier(cfg, r.step, elapsed), progress(cfg, r.step, elapsed)
        if cfg.num_loops > 0 and not r.base.looping and (r.step >= cfg.loop_at_step > 0 or (not cfg.loop_at_step and frac >= cfg.loop_at_frac)):
            r.base.looping = True  # all ranks agree: the schedule reads the shared clock
            log(f"layer_loop:on step:{r.step} frac:{frac:.3f} schedule:{layer_order(cfg, True)}")
        if cfg.qat and not qat_on and lr_mul < cfg.qat_lr_threshold:
            qat_on = True
            r.base.qat_mix.fill_(1.0)
            log(f"late_qat:on step:{r.step} lr_mul:{lr_mul:.4f} grid:per-row int{cfg.quant_bits_attn}/int{cfg.quant_bits_mlp} "
                f"clip:{'sdclip' if cfg.quant_clip == 'sdclip' else 'max'}")
        t_step = time.perf_counter()
        loss_acc += train_step(r, lr_mul, muon_momentum(cfg, r.step, elapsed, lr_mul))
        r.step += 1
        r.avg.update(r.step, lr_mul)
        n_acc += 1
        approx_ms = r.train_ms + 1000.0 * (time.perf_counter() - t0)
        window_ms += 1000.0 * (time.perf_counter() - t_step)
        if cap_ms is not None:  # every rank stops on the same step and schedules by the same (MAX) clock
            reached, agreed = vote(lambda: r.train_ms + 1000.0 * (time.perf_counter() - t0), step_ms, cap_ms)
            elapsed = elapsed if agreed is None else agreed
        step_ms = 1000.0 * (time.perf_counter() - t_step)
        stop_after = r.step if stop_after is None and reached else stop_after
        if r.step <= 10 or r.step % cfg.train_log_every == 0 or stop_after is not None or r.step == cfg.iterations:
            train_loss = (all_reduce_(loss_acc) / rt.world_size).item() / n_acc  # mean over ranks and steps since the last line
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train_loss is {train_loss} at step {r.step}: training diverged; lower the learning rates or enable grad_clip_norm")
            tok_s = cfg.train_batch_tokens * n_acc / max(window_ms / 1000.0, 1e-9)
            mfu = f"{100 * flops_per_token(cfg, r.base, r.base.looping) * tok_s / (peak * rt.world_size):.1f}%" if peak else "n/a"
            log(f"step:{r.step}/{cfg.iterations} train_loss:{train_loss:.4f} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / max(r.step, 1):.2f}ms tok_s:{tok_s:.0f} mfu:{mfu}")
            loss_acc, n_acc, window_ms = torch.zeros((), device=rt.device), 0, 0.0
        if cfg.checkpoint_every > 0 and r.step % cfg.checkpoint_every == 0 and r.step < cfg.iterations:
            sync(rt.device)  # checkpoint writes pause the clock too
            r.train_ms += 1000.0 * (time.perf_counter() - t0)
            save_checkpoint(r)
            t0 = time.perf_counter()

@torch.no_grad()
def generate(model: GPT, cfg: Config, n: int, device, seed: int, temperature: float = 0.8) -> Tensor:
    """n sequences of train_seq_len tokens sampled from the model from BOS (GPTQ self-calibration)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.full((n, 1), cfg.bos_id, dtype=torch.long, device=device)
    with autocast(cfg, device):
        for _ in range(cfg.train_seq_len - 1):
            p = torch.softmax(model(x)[:, -1].float() / temperature, -1)
            x = torch.cat([x, torch.multinomial(p, 1, generator=g)], 1)
    return x

def calibrate(r: Run) -> dict | None:
    """GPTQ Hessians (mean x^T x of every named matmul input) from training batches or from text the
    model generates itself - never validation data - inside the reserved end of the training clock."""
    global CAPTURE
    cfg, rt = r.cfg, r.rt
    if not cfg.gptq or cfg.quant_scheme != "mixed":
        return None
    t, H = time.perf_counter(), {}
    mode = r.base.training
    r.base.eval()
    per = max(cfg.train_batch_tokens // (rt.world_size * rt.grad_accum * cfg.train_seq_len), 1)  # sequences per generated batch
    n = max(len(range(rt.rank, cfg.gptq_calib_seqs, rt.world_size)), 1) if cfg.gptq_calib_seqs > 0 else per * cfg.gptq_calib_batches
    xs = ([generate(r.base, cfg, min(per, n - i), rt.device, cfg.seed + 1000 * rt.rank + i // per) for i in range(0, n, per)]
          if cfg.gptq_calib_source == "self" else
          [r.loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len)[0] for _ in range(cfg.gptq_calib_batches)])
    CAPTURE = lambda name, x: quantize.accumulate_hessian(H, name, x)  # noqa: E731
    try:
        with torch.no_grad(), autocast(cfg, rt.device):
            for x in xs:
                r.base(x)
    finally:
        CAPTURE = None
        r.base.train(mode)
    for name in sorted(H):  # every rank saw different batches: sum them
        H[name] = [all_reduce_(H[name][0]), H[name][1] * rt.world_size]
    sync(rt.device)
    calib_s, train_s = time.perf_counter() - t, r.train_ms / 1000
    r.log(f"gptq_calibration:{len(H)} hessians source:{cfg.gptq_calib_source} batches/rank:{len(xs)} seqs/rank:{sum(map(len, xs))} "
          f"time:{calib_s:.1f}s train_time:{train_s:.1f}s total:{train_s + calib_s:.1f}s reserve:{cfg.gptq_reserve_seconds:.1f}s")
    if cfg.max_wallclock_seconds > 0 and train_s + calib_s > cfg.max_wallclock_seconds:
        r.log(f"WARNING: training + calibration took {train_s + calib_s:.1f}s > max_wallclock_seconds {cfg.max_wallclock_seconds:.0f}: "
              "raise gptq_reserve_seconds; calibration must finish inside the training budget")
    return quantize.finalize_hessians(H)

def finish(r: Run, val_tokens: Tensor, tgt_bytes: Tensor, pre_bpb: float) -> None:
    """Resumable checkpoint, weight average, GPTQ calibration, raw weights, then one quantize.export (artifact and size
    lines), then every rank scores the artifact re-read from disk: what is submitted is what is scored."""
    cfg, rt, log = r.cfg, r.rt, r.log
    save_checkpoint(r)
    r.base.looping = cfg.num_loops > 0  # the scored model always runs its full schedule
    if cfg.weight_average != "none":
        log(f"weights_average:{r.avg.apply()}")
        t = time.perf_counter()
        val_loss, pre_bpb = eval_val(cfg, r.model, rt, val_tokens, tgt_bytes)
        log(f"post_average val_loss:{val_loss:.4f} val_bpb:{pre_bpb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
    hessians = calibrate(r)
    art_path = r.out_dir / f"final_model.{cfg.quant_scheme}.ptz"
    if rt.is_main:
        state = unbank({k: v.detach().cpu() for k, v in r.base.state_dict().items()})
        atomic_save(state, r.out_dir / "final_model.pt")
        quantize.export(art_path, state, asdict(cfg), (r.out_dir / "final_model.pt").stat().st_size, hessians=hessians,
                        dataset=r.dataset, code_texts=r.sources, log=log)
    sync(rt.device)  # the artifact is on disk before any rank reads it
    t = time.perf_counter()
    state, _, _ = quantize.read_artifact(art_path)
    r.base.load_state_dict(rebank(state), strict=True)
    r.base.qat_mix.zero_()  # a non-persistent buffer: late QAT would fake-quantize the artifact's weights again
    val_loss, val_bpb = eval_val(cfg, r.model, rt, val_tokens, tgt_bytes)
    name = f"final_{cfg.quant_scheme}_{cfg.compressor}_roundtrip"
    log(f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
    log(f"{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    log(f"quant_gap val_bpb:{val_bpb - pre_bpb:+.6f} (roundtrip {val_bpb:.6f} - pre-quant {pre_bpb:.6f})")
    sync(rt.device)  # gloo aborts if one rank tears down while a peer is still in a collective

def rescue(r: Run, err: Exception) -> str:
    """A failed final write must not lose a trained model: its weights go to the first place that takes them."""
    ck = {"model": {k: v.detach().cpu() for k, v in r.base.state_dict().items()}, "config": asdict(r.cfg), "banks": BANKS}
    for path in (Path(d) / f"{r.cfg.run_id}_rescued_weights.pt" for d in (r.out_dir, "logs", os.environ.get("TMPDIR", "/tmp"))):
        try:
            atomic_save(ck, path)
            return f"{err}; the trained weights are in {path} (`python3 quantize.py {path} --out A.ptz` makes the artifact)"
        except (OSError, RuntimeError):  # torch.save: RuntimeError for a missing dir or a failed write
            continue
    return f"{err}; the trained weights could not be saved anywhere either"

def run_cli(main_fn) -> None:
    """User errors end in one line and exit 2; the process group is torn down on every path."""
    code = 0
    try:
        main_fn(sys.argv[1:])
    except (ValueError, FloatingPointError, OSError) as e:  # bad input, data, artifact, path or disk: DataError, ArtifactError, ...
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # gloo can abort ("terminate called without an active exception") while the interpreter
        # tears down its threads; everything is written and flushed, so leave without teardown.
        for f in (sys.stdout, sys.stderr):
            f.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    sys.modules.setdefault("train_gpt", sys.modules[__name__])  # quantize/ttt_eval import this same module
    run_cli(main)
