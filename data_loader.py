"""Data for train_gpt.py and ttt_eval.py: official shards, the sequential distributed loader, the
dataset integrity check, the val stream and the byte accounting behind val_bpb. Code bytes count:
this file ships in every record folder next to train_gpt.py."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# DATA: official shard format (256 x int32 header, uint16 tokens), loaders, integrity

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
FIX_HINT = "re-create it with `python3 data/prepare.py` (download / text / sample)"

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
        raise DataError(f"{p}: {size} bytes but the header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes): truncated or corrupt; {FIX_HINT}")
    return n

def load_shard(path) -> np.ndarray:
    n = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)

def split_files(data_path, split: str) -> list[Path]:
    """fineweb_<split>_NNNNNN.bin, sorted; the strict name keeps the val_bytes sidecar out of the val split."""
    return sorted(p for p in Path(data_path).glob(f"fineweb_{split}_*.bin") if re.fullmatch(rf"fineweb_{split}_\d{{6}}\.bin", p.name))

def shard_files(data_path: str, split: str) -> list[Path]:
    files = split_files(data_path, split)
    if not files:
        raise DataError(f"no fineweb_{split}_*.bin shards in {data_path}; run `python3 data/prepare.py download --variant sp1024` "
                        "(or `python3 data/prepare.py sample` for the offline sample) and check data_path")
    return files

def check_token_range(tokens: np.ndarray, vocab_size: int, where) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"{where}: token id {int(tokens.max())} >= vocab_size {vocab_size}: data and tokenizer/vocab_size do not match")

class TokenStream:
    """Reads the sorted shards in order, forever; its position is (file index, offset) for resume."""

    def __init__(self, files: list[Path], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
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
    reads the same tokens in the same order at any (world size, grad_accum) split. A worker thread
    prepares the next batch (slice, int64, pinned) while this one trains; state() is the position
    after the batches handed out, so a checkpoint never skips the prefetched one."""

    def __init__(self, files: list[Path], rt: Runtime, vocab_size: int):
        self.rt, self.stream, self.ahead = rt, TokenStream(files, vocab_size), None
        self.pool, self.pos = ThreadPoolExecutor(1), self.stream.state()

    def _host(self, global_tokens: int, seq_len: int) -> Tensor:
        local = global_tokens // (self.rt.world_size * self.rt.grad_accum)
        span = self.stream.take(self.rt.world_size * (local + 1))
        t = torch.from_numpy(span[self.rt.rank * (local + 1) : (self.rt.rank + 1) * (local + 1)].astype(np.int64))
        return t.pin_memory() if self.rt.device.type == "cuda" else t

    def next_batch(self, global_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        key = (global_tokens, seq_len)
        if self.ahead is not None and self.ahead[0] != key:  # another shape: give the prefetched batch back
            self.load_state(self.pos)
        t = self.ahead[1].result() if self.ahead is not None else self._host(*key)
        self.pos, self.ahead = self.stream.state(), (key, self.pool.submit(self._host, *key))
        t = t.to(self.rt.device, non_blocking=True)
        if t.dim() == 2:  # rows of seq_len + 1 tokens (shuffled loader)
            return t[:, :-1], t[:, 1:]
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)

    def state(self) -> dict:
        return self.pos

    def load_state(self, s: dict) -> None:
        if self.ahead is not None:
            self.ahead[1].result()
        self.stream.load_state(s)
        self.pos, self.ahead = self.stream.state(), None

class ShuffledShards:
    """One rank of PR #1812's loader (rank r of W reads shards r, r+W, ...). A NumPy PCG64 seeded with the
    rank, never the run seed, drives it. Per shard, the start phase is one of 8 evenly spaced offsets in
    [0, min(T-1, n-T-1)] (np.linspace truncated to int), visited in a permutation of the 8 drawn once and
    advanced at each reset; the shard is cut into rows of T+1 tokens at phase + i*T in a random order.
    A batch takes rows from the shards in proportion to what remains (largest remainder, ties to the lower
    shard), walks the shards in a shuffled order and pops from the end of each shard's order. When fewer
    rows remain than a batch needs, every shard resets. Draw order (our choice where the issue is silent):
    the 8-permutations of all shards, then each shard's first row order; per batch one permutation of all
    the rank's shards. The state keeps the generator state behind each row order, not the orders."""

    def __init__(self, files: list[Path], rank: int, seq_len: int, vocab_size: int):
        self.files, self.T, self.vocab_size = files, seq_len, vocab_size
        self.sizes = [read_shard_header(f) for f in files]
        if not files or max(self.sizes) < seq_len + 1:
            raise DataError(f"train_loader=shuffled: (virtual) rank {rank} gets no shard of {seq_len + 1}+ tokens (it reads shards "
                            f"{rank}, {rank} + virtual_world_size, ...); add train shards or lower virtual_world_size")
        self.maps: dict[int, np.ndarray] = {}
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.phases = [np.linspace(0, max(min(seq_len - 1, n - seq_len - 1), 0), 8).astype(np.int64) for n in self.sizes]
        self.cycle = [self.rng.permutation(8) for _ in files]
        self.resets, self.left, self.order, self.drawn_from = [0] * len(files), [0] * len(files), [None] * len(files), [""] * len(files)
        for i in range(len(files)):
            self._reset(i)

    def _phase(self, i: int) -> int:
        return int(self.phases[i][self.cycle[i][(self.resets[i] - 1) % 8]])

    def _reset(self, i: int) -> None:
        self.resets[i] += 1
        self.drawn_from[i] = json.dumps(self.rng.bit_generator.state)
        self.order[i] = self.rng.permutation(max((self.sizes[i] - 1 - self._phase(i)) // self.T, 0))
        self.left[i] = len(self.order[i])

    def take(self, n: int) -> np.ndarray:
        if sum(self.left) < n:
            for i in range(len(self.files)):
                self._reset(i)
        if sum(self.left) < n:
            raise DataError(f"train_loader=shuffled: a rank's shards hold {sum(self.left)} rows, fewer than a batch ({n}); add shards")
        left = np.array(self.left, dtype=np.int64)
        count, rem = np.divmod(n * left, left.sum())
        count[np.argsort(-rem, kind="stable")[: n - int(count.sum())]] += 1
        rows = []
        for i in self.rng.permutation(len(self.files)):
            if count[i]:
                if i not in self.maps:
                    self.maps[i] = np.memmap(self.files[i], dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(self.sizes[i],))
                starts = self._phase(i) + self.T * self.order[i][self.left[i] - count[i] : self.left[i]][::-1]
                self.left[i] -= int(count[i])
                rows += [self.maps[i][s : s + self.T + 1] for s in starts]
        out = np.stack(rows)
        check_token_range(out, self.vocab_size, self.files[0].parent)
        return out

    def state(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state), "resets": list(self.resets), "left": list(self.left),
                "drawn_from": list(self.drawn_from)}

    def load_state(self, s: dict) -> None:
        self.resets, self.left, self.drawn_from = list(s["resets"]), list(s["left"]), list(s["drawn_from"])
        for i, st in enumerate(self.drawn_from):
            g = np.random.Generator(np.random.PCG64())
            g.bit_generator.state = json.loads(st)
            self.order[i] = g.permutation(max((self.sizes[i] - 1 - self._phase(i)) // self.T, 0))
        self.rng.bit_generator.state = json.loads(s["rng"])

class VirtualRanks:
    """The ranks a process stands in for: real rank r with grad_accum A runs virtual ranks r*A .. r*A+A-1,
    one per micro-step, so 1 GPU with virtual_world_size 8 sees exactly the rows 8 GPUs would."""

    def __init__(self, files: list[Path], rt: Runtime, seq_len: int, vocab_size: int):
        V, A = rt.world_size * rt.grad_accum, rt.grad_accum
        self.ranks, self.micro = [ShuffledShards(files[v::V], v, seq_len, vocab_size) for v in range(rt.rank * A, (rt.rank + 1) * A)], 0

    def take(self, n: int) -> np.ndarray:
        out = self.ranks[self.micro].take(n)
        self.micro = (self.micro + 1) % len(self.ranks)
        return out

    def state(self) -> dict:
        return {"micro": self.micro, "ranks": [r.state() for r in self.ranks]}

    def load_state(self, s: dict) -> None:
        self.micro = int(s["micro"])
        for r, st in zip(self.ranks, s["ranks"], strict=True):
            r.load_state(st)

class ShuffledSequenceLoader(DistributedTokenLoader):
    """PR #1812's data order (train_loader = "shuffled") behind the sequential loader's prefetch and resume."""

    def __init__(self, files: list[Path], rt: Runtime, vocab_size: int, seq_len: int):
        self.rt, self.stream, self.ahead = rt, VirtualRanks(files, rt, seq_len, vocab_size), None
        self.pool, self.pos = ThreadPoolExecutor(1), self.stream.state()

    def _host(self, global_tokens: int, seq_len: int) -> Tensor:
        if seq_len != self.stream.ranks[0].T:
            raise ValueError(f"the shuffled loader cuts rows of train_seq_len={self.stream.ranks[0].T}, not {seq_len}")
        t = torch.from_numpy(self.stream.take(global_tokens // (self.rt.world_size * self.rt.grad_accum * seq_len)).astype(np.int64))
        return t.pin_memory() if self.rt.device.type == "cuda" else t

def make_loader(cfg: Config, files: list[Path], rt: Runtime) -> DistributedTokenLoader:
    if cfg.train_loader == "shuffled":
        return ShuffledSequenceLoader(files, rt, cfg.vocab_size, cfg.train_seq_len)
    return DistributedTokenLoader(files, rt, cfg.vocab_size)

def check_dataset(cfg: Config, val_stream: np.ndarray, train_files: list[Path], bos_id: int) -> list[str]:
    """The integrity check lives with the manifest format in data/prepare.py; a record folder that
    ships only the three scripts skips it (and says so)."""
    path = HERE / "data" / "prepare.py"
    if not path.is_file():
        return [f"dataset_check:skipped ({path} not found)"]
    spec = importlib.util.spec_from_file_location("pgolf_prepare", path)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare.check_dataset(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, bos_id, val_stream, train_files, cfg.data_check_train_shards,
                                 cfg.record_mode)

def dataset_fingerprint(val_stream: np.ndarray, tokenizer_path) -> dict:
    """What a score depends on, stored in the artifact: ttt_eval.py refuses other val tokens or another tokenizer."""
    return {"val_sha256": hashlib.sha256(val_stream.tobytes()).hexdigest(), "val_tokens": int(val_stream.size),
            "tokenizer_sha256": hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()}

def check_outputs(dirs, need_bytes: int = 0) -> None:
    """Every output dir can be created and written, with need_bytes free: found at start, not at a trained run's last write."""
    for d in map(Path, dirs):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write_probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            free = shutil.disk_usage(d).free
        except OSError as e:
            raise ValueError(f"output dir {d} is not writable ({e.strerror or e}); set out_dir, or run from a writable directory") from None
        if free < need_bytes:
            raise ValueError(f"output dir {d} has {free / 2**20:,.0f} MiB free; checkpoints and the artifact need about "
                             f"{need_bytes / 2**20:,.0f} MiB: free some space or set out_dir elsewhere")

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
# BYTE ACCOUNTING: val_bpb = sum NLL / (ln 2 * sum bytes of the SentencePiece-normalised text), or of the
# original text for CaseOps data (per-token byte sidecar)

CASEOPS_OPERATORS = "\ue001\ue002\ue003\ue004"  # TITLE, ALLCAPS, CAPNEXT, ESC (data/caseops.py)

def build_byte_luts(sp, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token (base_bytes, has_leading_space, is_boundary); ids past the model's vocab are boundaries."""
    n = max(int(sp.vocab_size()), vocab_size)
    base, space, boundary = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.bool_), np.ones(n, dtype=np.bool_)
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

def val_target_bytes(cfg: Config, sp, tokens: np.ndarray) -> np.ndarray:
    """Bytes of the target at each position of a val stream (int32; position 0 is never a target). CaseOps
    data: its byte sidecar (fineweb_val_bytes_*.bin, the ORIGINAL text's UTF-8 bytes per token), because LUT
    bytes of the transformed text would count the case operators; any other data: the LUT rule above."""
    sidecar = split_files(cfg.data_path, "val_bytes")
    reserved = [sp.piece_to_id(c) for c in CASEOPS_OPERATORS] == [4, 5, 6, 7]
    if cfg.caseops_enabled != bool(sidecar) or cfg.caseops_enabled != reserved:
        raise DataError(f"caseops_enabled={cfg.caseops_enabled} but {cfg.data_path} has {len(sidecar)} byte sidecar file(s) and "
                        f"{cfg.tokenizer_path} {'reserves' if reserved else 'lacks'} the CaseOps operators at ids 4..7: CaseOps data needs "
                        "caseops_enabled=true, its sidecar and its tokenizer (`python data/prepare.py ... --caseops`), other data none")
    if not sidecar:
        out = np.zeros(tokens.size, dtype=np.int32)
        out[1:] = target_bytes(tokens[:-1], tokens[1:], build_byte_luts(sp, cfg.vocab_size))
        return out
    out = np.concatenate([load_shard(f) for f in sidecar]).astype(np.int32)
    if out.size != tokens.size:
        raise DataError(f"{cfg.data_path}: byte sidecar has {out.size} entries for {tokens.size} val tokens: re-create it with `--caseops`")
    out[0] = 0
    return out

def bits_per_byte(nll_sum: float, byte_sum: float) -> float:
    return nll_sum / (math.log(2.0) * byte_sum)

def load_tokenizer(cfg: Config):
    import sentencepiece as spm
    p = Path(cfg.tokenizer_path)
    if not p.is_file():
        raise DataError(f"tokenizer {p} not found; download it with data/prepare.py or fix tokenizer_path")
    sp = spm.SentencePieceProcessor(model_file=str(p))
    if int(sp.vocab_size()) != cfg.vocab_size or int(sp.bos_id()) != cfg.bos_id:
        raise ValueError(f"tokenizer {p} has vocab {sp.vocab_size()} but config vocab_size={cfg.vocab_size} (tokenizer bos_id "
                         f"{sp.bos_id()}, config bos_id={cfg.bos_id}); make them match")
    return sp
