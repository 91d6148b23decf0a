"""Parameter Golf trainer: config, data, byte LUTs, model, optimizers, training loop, artifact.

Launch:  torchrun --standalone --nproc_per_node=8 train_gpt.py --config configs/baseline.toml
         python train_gpt.py --config configs/smoke.toml        (one process, CPU or GPU)
Config sources, later wins: Config defaults < TOML file < env vars named like the field in
UPPER_CASE (NUM_LAYERS, SEED, ...) < --key=value flags. Importing this file does no work.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import typing
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None

HERE = Path(__file__).resolve().parent
SIZE_CAP_BYTES = 16_000_000  # decimal, not MiB

# -----------------------------------------------------------------------------
# CONFIG


@dataclass
class Config:
    # data and run identity
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""  # "" -> a fresh id; logs go to logs/<run_id>.txt
    out_dir: str = ""  # "" -> runs/<run_id>; checkpoints and the artifact land here
    seed: int = 1337
    data_check_train_shards: int = 1  # train shards scanned for val documents at start (0 = skip)
    # schedule and batch
    iterations: int = 20000
    warmdown_iters: int = 1200
    warmup_steps: int = 20  # compile-priming steps, reverted afterwards; not an LR warmup
    train_batch_tokens: int = 524288  # global tokens per optimizer step
    train_seq_len: int = 1024
    max_wallclock_seconds: float = 600.0  # <= 0 disables the cap
    virtual_world_size: int = 8  # grad_accum = virtual_world_size // WORLD_SIZE: same batch on 1..8 GPUs
    # eval and logging
    val_batch_size: int = 524288
    val_loss_every: int = 1000
    train_log_every: int = 200
    # model
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    # optimizers
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.05
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    control_tensor_name_patterns: str = (
        "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,skip_weights"
    )
    # runtime
    device: str = "auto"  # auto | cuda | cpu
    autocast_dtype: str = "bf16"  # bf16 | fp32
    compile: bool = True  # torch.compile(fullgraph) on CUDA; CPU always runs eager
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    # artifact
    quant_scheme: str = "int8"
    compressor: str = "zlib"


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def config_field_types() -> dict[str, type]:
    return {f.name: _TYPES[f.type] for f in fields(Config)}


def _coerce(key: str, value, typ: type, source: str):
    bad = ValueError(f"config key '{key}' from {source}: {value!r} is not a valid {typ.__name__}")
    if isinstance(value, str) and typ is not str:
        s = value.strip().lower()
        if typ is bool:
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise bad
        try:
            return typ(s) if typ is float else int(s)
        except ValueError:
            raise bad from None
    if typ is bool and type(value) is int and value in (0, 1):
        return bool(value)
    if typ is float and type(value) is int:
        return float(value)
    if type(value) is not typ:
        raise bad
    return value


def _check_key(key: str, types: dict, source: str) -> None:
    if key not in types:
        near = difflib.get_close_matches(key, list(types), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown config key '{key}' in {source}{hint}; see `python train_gpt.py --help`")


def load_config(path: str | None = None, overrides: dict | None = None, environ=None) -> tuple[Config, dict]:
    """Resolve a Config; returns it and {key: source} for every key not left at its default."""
    types, values, sources = config_field_types(), {}, {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {path} not found")
        if tomllib is None:
            raise ValueError("reading TOML configs needs Python >= 3.11 (tomllib)")
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
    cfg = Config(**values)
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
    need(c.device in ("auto", "cuda", "cpu"), f"device must be auto, cuda or cpu, got '{c.device}'")
    need(c.autocast_dtype in ("bf16", "fp32"), f"autocast_dtype must be bf16 or fp32, got '{c.autocast_dtype}'")
    need(c.virtual_world_size >= 1, "virtual_world_size must be >= 1")
    need(c.train_seq_len >= 1 and c.train_batch_tokens >= c.train_seq_len, "train_batch_tokens must be >= train_seq_len")
    need(c.iterations >= 0 and c.warmup_steps >= 0, "iterations and warmup_steps must be >= 0")


USAGE = """usage: train_gpt.py [--config FILE.toml] [--key=value ...] [--dry-run] [--resume CKPT]
  --dry-run      build the model, print model_params and the resolved config, exit
  --resume CKPT  continue a run from a checkpoint written by this script
config keys (env var = KEY in upper case):"""


def parse_cli(argv: list[str]) -> tuple[dict, dict]:
    opts, overrides, i = {"config": None, "dry_run": False, "resume": None}, {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(USAGE)
            for f in fields(Config):
                print(f"  --{f.name}={f.default!r}  ({f.type})")
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument '{arg}': options look like --key=value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "dry_run":
            opts["dry_run"] = _coerce(key, val, bool, "--dry-run") if eq else True
            continue
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                val, i = argv[i], i + 1
            elif config_field_types().get(key) is bool:
                val = "1"
            else:
                raise ValueError(f"option --{key} needs a value (--{key}=VALUE)")
        if key in ("config", "resume"):
            opts[key] = val
        else:
            overrides[key] = val
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(cfg: Config) -> Runtime:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.virtual_world_size % world != 0:
        raise ValueError(
            f"WORLD_SIZE={world} must divide virtual_world_size={cfg.virtual_world_size} "
            "(grad_accum = virtual_world_size // WORLD_SIZE keeps the global batch fixed)"
        )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA GPU; use --device=cpu or auto")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    return Runtime(rank, world, local_rank, device, cfg.virtual_world_size // world)


def all_reduce_(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# DATA: official shard format (256 x int32 header, uint16 tokens), loaders, integrity

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
FIX_HINT = "re-create it with `python data/prepare.py` (download / text / sample)"


class DataError(ValueError):
    """Missing or corrupt data; the message names the file and what to do."""


def read_shard_header(path) -> int:
    """Validate a shard's header against its size; return its token count."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: shard not found; {FIX_HINT}")
    size = p.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{p}: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header (empty or truncated); {FIX_HINT}")
    header = np.fromfile(p, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{p}: bad magic {int(header[0])} (expected {SHARD_MAGIC}): not a token shard; {FIX_HINT}")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{p}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION}); {FIX_HINT}")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_BYTES + 2 * n:
        raise DataError(
            f"{p}: {size} bytes but the header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes): "
            f"truncated or corrupt; {FIX_HINT}"
        )
    return n


def load_shard(path) -> np.ndarray:
    n = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)


def shard_files(data_path: str, split: str) -> list[Path]:
    files = sorted(Path(data_path).glob(f"fineweb_{split}_*.bin"))
    if not files:
        raise DataError(
            f"no fineweb_{split}_*.bin shards in {data_path}; run `python data/prepare.py download --variant sp1024` "
            "(or `python data/prepare.py sample` for the offline sample) and check data_path"
        )
    return files


def check_token_range(tokens: np.ndarray, vocab_size: int, where) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{where}: token id {int(tokens.max())} >= vocab_size {vocab_size}: data and tokenizer/vocab_size do not match")


class TokenStream:
    """Reads the sorted shards in order, forever; its position is (file index, offset) for resume."""

    def __init__(self, files: list[Path], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.file_idx, self.pos, self.tokens = 0, 0, None
        self._load(0)

    def _load(self, idx: int) -> None:
        self.file_idx, self.pos = idx, 0
        self.tokens = load_shard(self.files[idx])
        check_token_range(self.tokens, self.vocab_size, self.files[idx])

    def take(self, n: int) -> np.ndarray:
        parts, left = [], n
        while left > 0:
            if self.pos >= len(self.tokens):
                self._load((self.file_idx + 1) % len(self.files))
                continue
            k = min(left, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos, left = self.pos + k, left - k
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def state(self) -> dict:
        return {"file_idx": self.file_idx, "pos": self.pos}

    def load_state(self, s: dict) -> None:
        self._load(int(s["file_idx"]) % len(self.files))
        self.pos = int(s["pos"])


class DistributedTokenLoader:
    """Each call takes world*(local+1) contiguous tokens; rank r keeps its slice. So a global step
    reads the same tokens in the same order at any (world size, grad_accum) split."""

    def __init__(self, files: list[Path], rt: Runtime, vocab_size: int):
        self.rt, self.stream = rt, TokenStream(files, vocab_size)

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        local = global_tokens // (self.rt.world_size * self.rt.grad_accum)
        span = self.stream.take(self.rt.world_size * (local + 1))
        mine = span[self.rt.rank * (local + 1) : (self.rt.rank + 1) * (local + 1)]
        t = torch.from_numpy(mine.astype(np.int64))
        if self.rt.device.type == "cuda":
            t = t.pin_memory().to(self.rt.device, non_blocking=True)
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


def doc_hashes(tokens: np.ndarray, bos_id: int, k: int = 16) -> np.ndarray:
    """64-bit fingerprint per BOS-started document: length plus its first and last k tokens."""
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.append(starts[1:], tokens.size)
    ar = np.arange(k)
    first = np.minimum(starts[:, None] + ar, ends[:, None] - 1)
    last = np.maximum(ends[:, None] - 1 - ar, starts[:, None])
    cols = np.concatenate([tokens[first], tokens[last], (ends - starts)[:, None]], axis=1).astype(np.uint64)
    h = np.full(starts.size, 14695981039346656037, dtype=np.uint64)  # FNV-1a over the columns
    for j in range(cols.shape[1]):
        h = (h ^ cols[:, j]) * np.uint64(1099511628211)
    return h


def check_dataset(cfg: Config, val_files: list[Path], train_files: list[Path], val_tokens: np.ndarray, bos_id: int) -> list[str]:
    """Fail on a dataset that would make the score wrong: val count/hash differs from the manifest,
    a shard in both splits, or val documents inside the train shards. Returns log lines."""
    lines, root = [], Path(cfg.data_path)
    mpath = root / "manifest.json"
    val_sha = hashlib.sha256(val_tokens.tobytes()).hexdigest()
    lines.append(f"dataset_fingerprint:val_sha256={val_sha[:16]} val_tokens:{val_tokens.size} val_shards:{len(val_files)}")
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
            splits = m["splits"]
        except (ValueError, KeyError) as e:
            raise DataError(f"{mpath}: unreadable manifest ({e}); re-run `python data/prepare.py index {root} --tokenizer {cfg.tokenizer_path}`") from None
        if int(m.get("vocab_size", cfg.vocab_size)) != cfg.vocab_size or int(m.get("bos_id", bos_id)) != bos_id:
            raise DataError(f"{mpath}: dataset vocab_size/bos_id {m.get('vocab_size')}/{m.get('bos_id')} != tokenizer's {cfg.vocab_size}/{bos_id}")
        tok_sha = m.get("tokenizer", {}).get("sha256")
        if tok_sha and tok_sha != hashlib.sha256(Path(cfg.tokenizer_path).read_bytes()).hexdigest():
            raise DataError(
                f"{cfg.tokenizer_path} is not the tokenizer these shards were made with (sha256 differs from {mpath}): "
                "val_bpb would count the wrong bytes; point tokenizer_path at the dataset's tokenizer"
            )
        if int(m.get("val_tokens", val_tokens.size)) != val_tokens.size:
            raise DataError(
                f"{root}: val shards hold {val_tokens.size} tokens but the manifest says {m['val_tokens']}: "
                "val split is not the one the manifest describes; re-download or re-prepare it"
            )
        if m.get("val_sha256") and m["val_sha256"] != val_sha:
            raise DataError(f"{root}: val tokens do not match the manifest's val_sha256: corrupt or replaced val shards")
        names = {s: {d["file"] for d in splits.get(s, {}).get("shards", [])} for s in ("val", "train")}
        hashes = {s: {d.get("sha256") for d in splits.get(s, {}).get("shards", [])} - {None} for s in ("val", "train")}
        if names["val"] & names["train"] or hashes["val"] & hashes["train"]:
            raise DataError(f"{mpath}: a shard appears in both the train and val splits")
        lines.append(f"dataset_manifest:{mpath} val_docs:{splits['val'].get('docs')} val_bytes:{m.get('val_bytes')}")
    else:
        lines.append(f"dataset_manifest:none ({mpath} missing; record one with `python data/prepare.py index {root} --tokenizer {cfg.tokenizer_path}`)")
    if cfg.data_check_train_shards > 0:
        vh = doc_hashes(val_tokens, bos_id)
        th = np.concatenate([doc_hashes(load_shard(f), bos_id) for f in train_files[: cfg.data_check_train_shards]])
        hit = np.isin(vh, th)  # a few exact duplicates are normal in web text; a leak is many
        if hit.sum() > max(5, 0.02 * vh.size):
            raise DataError(
                f"{root}: {int(hit.sum())}/{vh.size} val documents also occur in the first "
                f"{cfg.data_check_train_shards} train shard(s): train/val leak; rebuild the shards with disjoint splits"
            )
        lines.append(f"dataset_disjoint:val_docs_in_train={int(hit.sum())}/{vh.size} train_shards_checked:{min(len(train_files), cfg.data_check_train_shards)}")
    return lines


def load_val_stream(files: list[Path], vocab_size: int) -> np.ndarray:
    """All val shards in sorted order (the whole stream, before any truncation)."""
    tokens = np.concatenate([load_shard(f) for f in files])
    check_token_range(tokens, vocab_size, files[0].parent)
    return tokens


def usable_val(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Baseline scoring set: whole windows of seq_len; the tail past the last window is dropped."""
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(f"val split has {tokens.size} tokens, fewer than train_seq_len+1={seq_len + 1}")
    return tokens[: usable + 1]


# -----------------------------------------------------------------------------
# BYTE ACCOUNTING: val_bpb = sum NLL / (ln 2 * sum bytes of the SentencePiece-normalised text)


def build_byte_luts(sp, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token (base_bytes, has_leading_space, is_boundary); ids past the model's vocab are boundaries."""
    n = max(int(sp.vocab_size()), vocab_size)
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=np.bool_)
    boundary = np.ones(n, dtype=np.bool_)
    for i in range(int(sp.vocab_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def target_bytes(prev_ids, tgt_ids, luts):
    """Bytes of each target: its base bytes, +1 for a leading space unless the previous token is a boundary.
    Works on numpy arrays or torch tensors (luts of the same kind)."""
    base, space, boundary = luts
    return base[tgt_ids] + (space[tgt_ids] & ~boundary[prev_ids])


def bits_per_byte(nll_sum: float, byte_sum: float) -> float:
    return nll_sum / (math.log(2.0) * byte_sum)


def load_tokenizer(cfg: Config):
    import sentencepiece as spm

    p = Path(cfg.tokenizer_path)
    if not p.is_file():
        raise DataError(f"tokenizer {p} not found; download it with data/prepare.py or fix tokenizer_path")
    sp = spm.SentencePieceProcessor(model_file=str(p))
    if int(sp.vocab_size()) != cfg.vocab_size:
        raise ValueError(f"tokenizer {p} has vocab {sp.vocab_size()} but config vocab_size={cfg.vocab_size}; make them match")
    return sp


# -----------------------------------------------------------------------------
# MODEL: the baseline GPT (RMSNorm, GQA attention with QK-norm + RoPE, relu^2 MLP, U-Net skips)


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype at matmul time."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    # cos/sin are recomputed per call (cheap, folded by compile): a cache filled under
    # inference_mode would later break backward through it (TTT pitfall).
    def __init__(self, dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim), persistent=False)

    def forward(self, seq_len: int, device) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
        return freqs.cos()[None, None], freqs.sin()[None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The one attention path for training, eval and TTT. q: (B,H,T,D), k/v: (B,KV,T,D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d, self.h, self.kv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.hd = d // self.h
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, self.kv * self.hd)
        self.c_v = CastedLinear(d, self.kv * self.hd)
        self.proj = CastedLinear(d, d, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.hd, cfg.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        cos, sin = self.rotary(T, x.device)
        q = apply_rotary(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(rms_norm(k), cos, sin)
        y = attention(q.to(v.dtype), k.to(v.dtype), v)  # norms may run in fp32 under autocast; keep SDPA in bf16
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.model_dim
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.n_enc = cfg.num_layers // 2
        self.n_dec = cfg.num_layers - self.n_enc
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, self.n_dec), cfg.model_dim))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Logits (B,T,V) when target_ids is None, else cross-entropy (mean, or per token with reduction='none')."""
        x = rms_norm(self.tok_emb(input_ids))
        x0, skips = x, []
        for block in self.blocks[: self.n_enc]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.n_enc :]):
            if skips:  # U-Net: decoder block i takes the mirrored encoder output (LIFO)
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        x = rms_norm(x)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w.to(x.dtype))
        cap = self.cfg.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if target_ids is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction=reduction)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: Config, model: nn.Module) -> float:
    """Training FLOPs per token: 6 x matmul weights (incl. the output head) + causal attention
    (QK^T and AV average seq_len/2 keys per query: 6 * L * T * d for forward + backward)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks."))
    matmul += cfg.vocab_size * cfg.model_dim
    return 6.0 * matmul + 6.0 * cfg.num_layers * cfg.train_seq_len * cfg.model_dim


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# -----------------------------------------------------------------------------
# OPTIMIZERS: Muon for block matrices, Adam for embeddings and scalars

NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximate the orthogonal polar factor of G (quintic Newton-Schulz, in bf16)."""
    a, b, c = NS5_COEFFS
    X = G.bfloat16()
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised, scaled by sqrt(max(1, rows/cols)). Matrix i is owned by
    rank i % world: only the owner keeps momentum and runs Newton-Schulz; one all-reduce of the
    flat update buffer hands every rank all updates (no collective at world size 1)."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, rank: int = 0, world_size: int = 1):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))
        self.rank, self.world_size = rank, world_size
        self._ns = newton_schulz5

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            lr, mom = group["lr"], group["momentum"]
            # NS output is bf16, so an fp32 buffer is exact; gloo cannot reduce bf16.
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(mom).add_(p.grad)
                    g = self._ns(p.grad.add(buf, alpha=mom), group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if self.world_size > 1:
                all_reduce_(flat)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-lr)
                offset += p.numel()

    def gather_buffers(self) -> list[Tensor]:
        """Every momentum buffer, on every rank (for world-size-independent checkpoints)."""
        out = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                buf = self.state[p].get("momentum_buffer")
                buf = buf.clone() if buf is not None else torch.zeros_like(p)
                if self.world_size > 1:
                    dist.broadcast(buf, src=i % self.world_size)
                out.append(buf)
        return out

    def load_buffers(self, bufs: list[Tensor]) -> None:
        idx = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if i % self.world_size == self.rank:
                    self.state[p]["momentum_buffer"] = bufs[idx].to(p.device, p.dtype).clone()
                idx += 1


def param_groups(model: nn.Module, cfg: Config) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter goes to exactly one group: embed, head, matrix (Muon) or scalar."""
    control = [s for s in cfg.control_tensor_name_patterns.split(",") if s]
    groups = {"embed": [], "head": [], "matrix": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "tok_emb.weight":
            groups["embed"].append((name, p))
        elif name == "lm_head.weight":
            groups["head"].append((name, p))
        elif p.ndim == 2 and name.startswith("blocks.") and not any(c in name for c in control):
            groups["matrix"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    seen = [id(p) for g in groups.values() for _, p in g]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    if sorted(seen) != sorted(trainable) or len(set(seen)) != len(seen):
        raise RuntimeError("optimizer groups do not cover every trainable parameter exactly once")
    return groups


def build_optimizers(model: nn.Module, cfg: Config, rt: Runtime) -> tuple[list[torch.optim.Optimizer], Muon]:
    groups = param_groups(model, cfg)
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=rt.device.type == "cuda")
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    adam_groups = [(groups["embed"], embed_lr), (groups["head"], cfg.head_lr), (groups["scalar"], cfg.scalar_lr)]
    adams = [
        torch.optim.Adam([{"params": [p for _, p in g], "lr": lr, "base_lr": lr}], **adam_kw)
        for g, lr in adam_groups
        if g
    ]
    muon = Muon([p for _, p in groups["matrix"]], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_backend_steps, rt.rank, rt.world_size)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
    return adams + [muon], muon


def lr_multiplier(cfg: Config, step: int, elapsed_ms: float) -> float:
    """Linear warmdown to 0 over the last warmdown_iters steps; with a wallclock cap the steps are
    converted to time using the measured step average, so the decay ends at the cap."""
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        return max((cfg.iterations - step) / cfg.warmdown_iters, 0.0) if step >= start else 1.0
    warmdown_ms = cfg.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(1000.0 * cfg.max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(cfg: Config, step: int) -> float:
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


# -----------------------------------------------------------------------------
# EVALUATION AND LOGGING


def autocast(cfg: Config, device: torch.device):
    dtype = torch.bfloat16 if cfg.autocast_dtype == "bf16" else torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def eval_val(cfg: Config, model: nn.Module, rt: Runtime, val_tokens: Tensor, luts) -> tuple[float, float]:
    """Baseline eval: non-overlapping windows of train_seq_len, each scored from a fresh context,
    windows split contiguously across ranks, sums in float64 and all-reduced."""
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
            sums[2] += target_bytes(x, y, luts).double().sum()
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
        if not self.rt.is_main:
            return
        if console:
            print(msg, flush=True)
        self.fh.write(msg + "\n")
        self.fh.flush()


def log_provenance(log: Logger, cfg: Config, sources: dict) -> None:
    for name in ("train_gpt.py", "quantize.py"):
        f = HERE / name
        if f.is_file():
            log(f"# ===== source: {name} =====\n{f.read_text(encoding='utf-8')}", console=False)
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
    log(f"config:{json.dumps(asdict(cfg), sort_keys=True)}")
    if sources:
        log("config_sources:" + " ".join(f"{k}={v}" for k, v in sorted(sources.items())))


# -----------------------------------------------------------------------------
# CHECKPOINTS (plain tensors and primitives only: loaded with weights_only=True)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model, optimizers, muon: Muon, loader, step, train_ms, cfg, rt, log) -> None:
    bufs = muon.gather_buffers()  # collective: every rank calls it
    if rt.is_main:
        state = {
            "format": "pgolf-ckpt/1",
            "step": step,
            "training_time_ms": train_ms,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "adam": [o.state_dict() for o in optimizers if o is not muon],
            "muon_buffers": [b.cpu() for b in bufs],
            "loader": loader.stream.state(),
            "config": asdict(cfg),
        }
        atomic_save(state, path)
        old = sorted(path.parent.glob("ckpt_step*.pt"))
        for f in old[: max(len(old) - cfg.keep_checkpoints, 0)]:
            f.unlink()
        log(f"checkpoint:{path} step:{step}")


def load_checkpoint(path: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} not found") from None
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise ValueError(f"checkpoint {path} is unreadable or not a plain-tensor checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != "pgolf-ckpt/1":
        raise ValueError(f"{path} is not a checkpoint written by train_gpt.py")
    return ck


MODEL_KEYS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings")


def restore_checkpoint(ck: dict, cfg: Config, model, optimizers, muon: Muon, loader) -> tuple[int, float]:
    diff = [k for k in MODEL_KEYS if ck["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint model shape differs from the config in {', '.join(diff)}; resume with the same model config")
    model.load_state_dict(ck["model"], strict=True)
    adams = [o for o in optimizers if o is not muon]
    for o, s in zip(adams, ck["adam"], strict=True):
        o.load_state_dict(s)
    muon.load_buffers(ck["muon_buffers"])
    loader.stream.load_state(ck["loader"])
    return int(ck["step"]), float(ck["training_time_ms"])


# -----------------------------------------------------------------------------
# TRAINING


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(cfg, model, optimizers, muon, loader, rt, step: int, lr_mul: float) -> Tensor:
    """One optimizer step over grad_accum micro-batches; returns this rank's mean loss (on device)."""
    loss_sum = torch.zeros((), device=rt.device)
    for _ in range(rt.grad_accum):
        x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len)
        with autocast(cfg, rt.device):
            loss = model(x, y)
        (loss / rt.grad_accum).backward()
        loss_sum += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if rt.distributed:  # gradient average over ranks in one flat buffer
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        all_reduce_(flat).div_(rt.world_size)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
    for g in muon.param_groups:
        g["momentum"] = muon_momentum(cfg, step)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mul
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum / rt.grad_accum


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
    log = Logger(rt, cfg.run_id, append=ck is not None)
    if ck is not None:
        log(f"resume:{opts['resume']} step:{ck['step']}")
    log_provenance(log, cfg, sources)
    seed_everything(cfg.seed)

    # tokenizer, byte LUTs, data integrity
    sp = load_tokenizer(cfg)
    luts_np = build_byte_luts(sp, cfg.vocab_size)
    luts = tuple(torch.from_numpy(a).to(rt.device) for a in luts_np)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={cfg.tokenizer_path}")
    train_files, val_files = shard_files(cfg.data_path, "train"), shard_files(cfg.data_path, "val")
    val_stream = load_val_stream(val_files, cfg.vocab_size)
    for line in check_dataset(cfg, val_files, train_files, val_stream, int(sp.bos_id())):
        log(line)
    val_tokens = torch.from_numpy(usable_val(val_stream, cfg.train_seq_len).astype(np.int32))  # int64 per batch
    log(f"train_loader:dataset:{Path(cfg.data_path).name} train_shards:{len(train_files)}")
    log(f"val_loader:shards pattern={Path(cfg.data_path) / 'fineweb_val_*.bin'} tokens:{val_tokens.numel() - 1}")

    # model and optimizers
    base_model = GPT(cfg).to(rt.device)
    use_compile = cfg.compile and rt.device.type == "cuda"
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if use_compile else base_model
    optimizers, muon = build_optimizers(base_model, cfg, rt)
    if use_compile:
        muon._ns = torch.compile(newton_schulz5)
    n_params = count_params(base_model)
    fpt = flops_per_token(cfg, base_model)
    peak = peak_flops(rt.device)
    log(f"model_params:{n_params}")
    log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum} device:{rt.device} compile:{use_compile} autocast:{cfg.autocast_dtype}")
    log("attention_backend:sdpa (torch scaled_dot_product_attention)")
    log(f"attention_mode:{'gqa' if cfg.num_kv_heads < cfg.num_heads else 'mha'} num_heads:{cfg.num_heads} num_kv_heads:{cfg.num_kv_heads}")
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    log(f"tie_embeddings:{cfg.tie_embeddings} embed_lr:{embed_lr} head_lr:{0.0 if cfg.tie_embeddings else cfg.head_lr} matrix_lr:{cfg.matrix_lr} scalar_lr:{cfg.scalar_lr}")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} train_seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} warmup_steps:{cfg.warmup_steps} max_wallclock_seconds:{cfg.max_wallclock_seconds:.3f}")
    log(f"seed:{cfg.seed}")
    if cfg.train_batch_tokens % (rt.world_size * rt.grad_accum * cfg.train_seq_len):
        raise ValueError(f"train_batch_tokens={cfg.train_batch_tokens} must be a multiple of virtual_world_size*train_seq_len={rt.world_size * rt.grad_accum * cfg.train_seq_len}")
    loader = DistributedTokenLoader(train_files, rt, cfg.vocab_size)

    # compile priming: real steps, then weights, optimizer state and loader are put back
    if cfg.warmup_steps > 0:
        init_model = copy.deepcopy(base_model.state_dict())
        init_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        for s in range(cfg.warmup_steps):
            train_step(cfg, model, optimizers, muon, loader, rt, s, 1.0)
            if cfg.warmup_steps <= 20 or (s + 1) % 10 == 0 or s + 1 == cfg.warmup_steps:
                log(f"warmup_step:{s + 1}/{cfg.warmup_steps}")
        base_model.load_state_dict(init_model)
        for o, s in zip(optimizers, init_opts):
            o.load_state_dict(s)
        loader = DistributedTokenLoader(train_files, rt, cfg.vocab_size)

    step, training_time_ms = 0, 0.0
    if ck is not None:
        step, training_time_ms = restore_checkpoint(ck, cfg, base_model, optimizers, muon, loader)
        del ck
    resumed_at = step if step > 0 else None  # that step's validation already ran before the crash
    cap_ms = 1000.0 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else None
    stop_after_step: int | None = None
    loss_acc = torch.zeros((), device=rt.device)
    steps_in_window, window_ms = 0, 0.0
    sync(rt.device)
    t0 = time.perf_counter()
    while True:
        last_step = step == cfg.iterations or (stop_after_step is not None and step >= stop_after_step)
        periodic = cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0 and step != resumed_at
        if last_step or periodic:  # validation pauses the train clock
            sync(rt.device)
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            val_loss, val_bpb = eval_val(cfg, model, rt, val_tokens, luts)
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"val_loss is {val_loss} at step {step}: training diverged; lower the learning rates")
            log(f"step:{step}/{cfg.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms")
            sync(rt.device)
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < cfg.iterations:
                log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{cfg.iterations}")
            break
        elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        t_step = time.perf_counter()
        loss_acc += train_step(cfg, model, optimizers, muon, loader, rt, step, lr_multiplier(cfg, step, elapsed_ms))
        step += 1
        steps_in_window += 1
        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        window_ms += 1000.0 * (time.perf_counter() - t_step)
        reached_cap = cap_ms is not None and approx_ms >= cap_ms
        if rt.distributed:  # all ranks stop on the same step
            flag = torch.tensor(float(reached_cap), device=rt.device)
            reached_cap = all_reduce_(flag, dist.ReduceOp.MAX).item() > 0
        if stop_after_step is None and reached_cap:
            stop_after_step = step
        if step <= 10 or step % cfg.train_log_every == 0 or stop_after_step is not None or step == cfg.iterations:
            loss_acc = all_reduce_(loss_acc) / rt.world_size  # mean over ranks and the steps since the last line
            train_loss = loss_acc.item() / steps_in_window
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train_loss is {train_loss} at step {step}: training diverged; lower the learning rates or enable grad_clip_norm")
            tok_s = cfg.train_batch_tokens * steps_in_window / max(window_ms / 1000.0, 1e-9)
            mfu = f"{100 * fpt * tok_s / (peak * rt.world_size):.1f}%" if peak else "n/a"
            log(f"step:{step}/{cfg.iterations} train_loss:{train_loss:.4f} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / max(step, 1):.2f}ms tok_s:{tok_s:.0f} mfu:{mfu}")
            loss_acc.zero_()
            steps_in_window, window_ms = 0, 0.0
        if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            out_dir.mkdir(parents=True, exist_ok=True)
            sync(rt.device)
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            save_checkpoint(out_dir / f"ckpt_step{step:06d}.pt", base_model, optimizers, muon, loader, step, training_time_ms, cfg, rt, log)
            t0 = time.perf_counter()

    if rt.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    finish(cfg, rt, log, base_model, model, optimizers, muon, loader, step, training_time_ms, val_tokens, luts, out_dir)


def finish(cfg, rt, log, base_model, model, optimizers, muon, loader, step, training_time_ms, val_tokens, luts, out_dir) -> None:
    """Raw checkpoint, int8+zlib artifact, size accounting, then score the artifact re-loaded from disk."""
    import quantize

    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / f"ckpt_step{step:06d}.pt", base_model, optimizers, muon, loader, step, training_time_ms, cfg, rt, log)
    art_path = out_dir / f"final_model.{cfg.quant_scheme}.ptz"
    code_bytes, code_detail = quantize.code_size(HERE)
    if rt.is_main:
        state = {k: v.detach().cpu() for k, v in base_model.state_dict().items()}
        raw_path = out_dir / "final_model.pt"
        atomic_save(state, raw_path)
        raw_bytes = raw_path.stat().st_size
        log(f"Serialized model: {raw_bytes} bytes")
        log(f"Code size: {code_bytes} bytes ({code_detail})")
        log(f"Total submission size: {raw_bytes + code_bytes} bytes")
        t = time.perf_counter()
        st = quantize.write_artifact(art_path, state, asdict(cfg), scheme=cfg.quant_scheme, compressor=cfg.compressor,
                                     control_patterns=cfg.control_tensor_name_patterns)
        tag = f"{cfg.quant_scheme}+{cfg.compressor}"
        log(f"Serialized model {tag}: {st['artifact_bytes']} bytes (payload:{st['payload_bytes']} container:{st['container_bytes']} payload_ratio:{st['payload_ratio']:.2f}x) serialize_time:{1000 * (time.perf_counter() - t):.0f}ms")
        total = st["artifact_bytes"] + code_bytes
        log(f"Total submission size {tag}: {total} bytes")
        if total > SIZE_CAP_BYTES:
            log(f"WARNING: total submission size {total} bytes is over the {SIZE_CAP_BYTES:,}-byte cap by {total - SIZE_CAP_BYTES} bytes: not a valid record")
        else:
            log(f"size_margin: {SIZE_CAP_BYTES - total} bytes under the {SIZE_CAP_BYTES:,}-byte cap")
    if rt.distributed:
        dist.barrier()
    t = time.perf_counter()
    state, _, _ = quantize.read_artifact(art_path)
    base_model.load_state_dict(state, strict=True)
    val_loss, val_bpb = eval_val(cfg, model, rt, val_tokens, luts)
    name = f"final_{cfg.quant_scheme}_{cfg.compressor}_roundtrip"
    log(f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
    log(f"{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    if rt.distributed:  # gloo aborts if one rank tears down while a peer is still in a collective
        dist.barrier()


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1:])
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # gloo can abort ("terminate called without an active exception") while the interpreter
        # tears down its threads; everything is written and flushed, so leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
