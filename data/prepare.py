#!/usr/bin/env python3
"""Datasets for Parameter Golf: the official cached shards, shards from your own text, an offline sample.

  python data/prepare.py download --variant sp1024 [--train-shards 80]      official shards from the HF hub
  python data/prepare.py text a.txt b.jsonl --vocab-size 1024 --val-docs 1000 --out data/datasets/mine_sp1024
  python data/prepare.py hf NAME [--config-name C] --tokenizer M.model --val-docs 1000 --out DIR
  python data/prepare.py sample                       offline corpus from Python's own docs, in seconds
  ... text / hf / sample --caseops                    CaseOps data (PR #1855): case transform, reserved-operator
                                                      tokenizer, val byte sidecar (data/caseops.py)
  python data/prepare.py index DIR --tokenizer M      manifest.json for shards made by other tools
  python data/prepare.py verify DIR                   re-hash the shards against manifest.json

Shard format: 256 little-endian int32 header (magic, version, token count, zeros), then uint16 tokens.
Each document is [BOS] + sp.encode(text) with no separator; val = the first N documents, train = the
rest, and the two splits never share a shard. Every dataset dir gets a manifest.json (build_manifest).
CaseOps data adds fineweb_val_bytes_NNNNNN.bin, one uint16 per val token in the same shard layout: the
UTF-8 bytes of the ORIGINAL text that token stands for (BOS 0), which val_bpb divides by instead of LUT bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import (  # noqa: E402  (the shard reader and byte LUTs live in the trainer)
    SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, DataError, build_byte_luts, check_token_range,
    load_shard, read_shard_header, target_bytes,
)
from data_loader import CASEOPS_OPERATORS, split_files  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
import caseops  # noqa: E402

SHARD_TOKENS = 10**8
MAX_VOCAB = 1 << 16  # token ids are stored as uint16
MANIFEST_FORMAT = "pgolf-dataset/1"
DEFAULT_REPOS = {"sp1024": "willdepueoai/parameter-golf", "sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf"}
CASEOPS_HELP = "CaseOps (PR #1855): lowercase + case operators, a tokenizer that reserves them, the val byte sidecar"
SP_TRAINER_ARGS = dict(  # the official tokenizer settings
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
)

# -----------------------------------------------------------------------------
# files: atomic writes, hashes, shards


def _atomic_write(path: Path, *chunks: bytes) -> None:
    """Write to a hidden temp file next to `path`, then rename over it: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def shards_on_disk(dataset_dir, split: str) -> list[Path]:
    return split_files(dataset_dir, split)


def _as_u16(tokens) -> np.ndarray:
    a = np.asarray(tokens)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= MAX_VOCAB):
        bad = int(a.max()) if int(a.max()) >= MAX_VOCAB else int(a.min())
        raise ValueError(f"token id {bad} does not fit uint16: shards hold ids 0..65535 (vocab > 65,536 is unsupported)")
    return a.astype("<u2")


def write_shard(path, tokens) -> int:
    """Write one official shard atomically; return its token count."""
    body = _as_u16(tokens)
    if body.size >= 2**31:
        raise ValueError(f"{path}: {body.size} tokens is too many for one shard (< 2^31)")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, body.size)
    _atomic_write(Path(path), header.tobytes(), body.tobytes())
    return int(body.size)


class ShardWriter:
    """Packs documents into fixed-size shards; documents may continue across shards of one split."""

    def __init__(self, out_dir, shard_tokens: int = SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"shard size must be >= 1 token (got {shard_tokens})")
        self.out_dir, self.buf, self.n = Path(out_dir), np.empty(shard_tokens, dtype="<u2"), 0
        self.split, self.index = None, 0

    def start_split(self, split: str) -> None:
        self.flush()
        self.split, self.index = split, 0

    def add(self, tokens) -> None:
        tokens, pos = _as_u16(tokens), 0
        while pos < tokens.size:
            k = min(tokens.size - pos, self.buf.size - self.n)
            self.buf[self.n : self.n + k] = tokens[pos : pos + k]
            self.n, pos = self.n + k, pos + k
            if self.n == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.n:
            write_shard(self.out_dir / shard_name(self.split, self.index), self.buf[: self.n])
            self.index, self.n = self.index + 1, 0


# -----------------------------------------------------------------------------
# tokenizer


def load_sp(path):
    import sentencepiece as spm

    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer {p} not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{p}: not a SentencePiece model ({e})") from None
    return check_sp(sp, p)


def check_sp(sp, where):
    if int(sp.vocab_size()) > MAX_VOCAB:
        raise ValueError(f"{where}: vocab {sp.vocab_size()} > 65,536: token ids would not fit the uint16 shards")
    if int(sp.bos_id()) < 0:
        raise ValueError(f"{where}: tokenizer has no BOS id; documents need [BOS] + tokens")
    return sp


def check_caseops_tokenizer(sp, where, caseops_on: bool):
    """A CaseOps dataset needs the operators as single reserved tokens (ids 4..7); other data must not use such a tokenizer."""
    reserved = [sp.piece_to_id(c) for c in CASEOPS_OPERATORS] == [4, 5, 6, 7]
    if caseops_on and not reserved:
        raise ValueError(f"{where}: --caseops needs a tokenizer trained with --caseops (CaseOps operators reserved at ids 4..7); "
                         "train one with --vocab-size V --caseops")
    if reserved and not caseops_on:
        raise ValueError(f"{where} is a CaseOps tokenizer (operators at ids 4..7): pass --caseops, or use a plain tokenizer")
    return sp


def train_tokenizer(texts: Iterable[str], vocab_size: int, caseops_on: bool = False) -> bytes:
    """Train a SentencePiece BPE model with the official settings; returns the serialized .model. With caseops_on
    the four CaseOps operators are user-defined symbols: always one token each, at ids 4..7, before the byte pieces."""
    import sentencepiece as spm

    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab size {vocab_size} must be in 1..65,536 (token ids are stored as uint16)")
    cleaned = (t for t in (x.replace("\x00", " ").strip() for x in texts) if t)
    first = next(cleaned, None)
    if first is None:
        raise ValueError("no documents in the input: nothing to train the tokenizer on")
    model, failed = io.BytesIO(), []

    def sentences():  # keep an input error (e.g. a bad jsonl line) instead of sentencepiece's wrapped copy
        try:
            yield first
            yield from cleaned
        except Exception as e:
            failed.append(e)
            raise

    try:  # num_threads stays at its default (16) so the saved model bytes do not depend on the machine
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, minloglevel=2, **SP_TRAINER_ARGS,
            **({"user_defined_symbols": list(CASEOPS_OPERATORS)} if caseops_on else {}),
        )
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        raise ValueError(f"sentencepiece training failed: {e}") from None
    return model.getvalue()


def save_tokenizer(model: bytes, path: Path):
    """Write <name>.model and the matching <name>.vocab (piece<TAB>score, as SentencePiece writes it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, model)
    _atomic_write(path.with_suffix(".vocab"), vocab.encode("utf-8"))


# -----------------------------------------------------------------------------
# manifest.json: computed from the shards on disk


def val_bytes(tokens: np.ndarray, luts) -> int:
    """Bytes the bpb metric divides by: target_bytes over targets 1..N-1 of a token stream (prev = the token before)."""
    total, step = 0, 1 << 24
    for i in range(0, tokens.size - 1, step):
        seg = tokens[i : i + step + 1]
        total += int(target_bytes(seg[:-1], seg[1:], luts).sum(dtype=np.int64))
    return total


def _scan_split(files: list[Path], bos_id: int, vocab_size: int) -> dict:
    shards, docs = [], 0
    for f in files:
        tokens = load_shard(f)
        check_token_range(tokens, vocab_size, f)
        docs += int(np.count_nonzero(tokens == bos_id))
        shards.append({"file": f.name, "tokens": int(tokens.size), "sha256": sha256_file(f)})
    return {"docs": docs, "tokens": sum(s["tokens"] for s in shards), "shards": shards}


def _sidecar(dataset_dir, val_shards: list[dict]) -> tuple[list[dict], np.ndarray] | None:
    """The CaseOps byte sidecar (None without one): its shard entries and values, checked to run 1:1 with the val shards."""
    files = shards_on_disk(dataset_dir, "val_bytes")
    if not files:
        return None
    shards = [{"file": f.name, "tokens": read_shard_header(f), "sha256": sha256_file(f)} for f in files]
    if [s["tokens"] for s in shards] != [s["tokens"] for s in val_shards]:
        raise DataError(f"{dataset_dir}: byte sidecar shards {[s['tokens'] for s in shards]} do not line up with the val shards "
                        f"{[s['tokens'] for s in val_shards]}: re-create the dataset with --caseops")
    return shards, np.concatenate([load_shard(f) for f in files])


def _val_stream(dataset_dir) -> np.ndarray:
    files = shards_on_disk(dataset_dir, "val")
    if not files:
        raise DataError(f"{dataset_dir}: no fineweb_val_*.bin shards")
    return np.concatenate([load_shard(f) for f in files])


def build_manifest(dataset_dir, tokenizer_path, source: str) -> dict:
    """Index the shards in dataset_dir, write dataset_dir/manifest.json atomically, return it."""
    d = Path(dataset_dir)
    sp = load_sp(tokenizer_path)
    vocab, bos = int(sp.vocab_size()), int(sp.bos_id())
    val, train = (_scan_split(shards_on_disk(d, s), bos, vocab) for s in ("val", "train"))
    stream, side = _val_stream(d), _sidecar(d, val["shards"])
    check_caseops_tokenizer(sp, tokenizer_path, side is not None)
    n_bytes = val_bytes(stream, build_byte_luts(sp, vocab)) if side is None else int(side[1][1:].sum(dtype=np.int64))
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "tokenizer": {"path": str(tokenizer_path), "sha256": sha256_file(tokenizer_path)},
        "vocab_size": vocab,
        "bos_id": bos,
        "splits": {"val": {"docs": val["docs"], "tokens": val["tokens"], "bytes": n_bytes, "shards": val["shards"]}, "train": train},
        "val_tokens": int(stream.size),
        "val_bytes": n_bytes,
        "val_sha256": hashlib.sha256(stream.tobytes()).hexdigest(),
        "caseops": side is not None,  # val_bytes = sidecar over targets 1..N-1: original (pre-transform) UTF-8 bytes
    }
    if side is not None:
        sha = hashlib.sha256(side[1].tobytes()).hexdigest()
        manifest["val_byte_sidecar"] = {"transform": caseops.NAME, "shards": side[0], "sha256": sha}
    _atomic_write(d / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def read_manifest(dataset_dir) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found; write one with `python data/prepare.py index {dataset_dir} --tokenizer MODEL`")
    try:
        m = json.loads(path.read_text())
        for split in ("val", "train"):
            m["splits"][split]["shards"]
        return m
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None


def verify(dataset_dir) -> str:
    """Re-hash every shard and check headers and counts against manifest.json; raise DataError on a mismatch."""
    d, m = Path(dataset_dir), read_manifest(dataset_dir)
    for split in ("val", "train"):
        want, got = m["splits"][split], _scan_split(shards_on_disk(d, split), int(m["bos_id"]), MAX_VOCAB)
        listed, found = ({s["file"]: s for s in x["shards"]} for x in (want, got))
        for name in sorted(listed.keys() | found.keys()):
            if name not in found or name not in listed:
                raise DataError(f"{d / name}: " + ("in the manifest but missing" if name in listed else "on disk but not in the manifest"))
            diff = [k for k in ("tokens", "sha256") if found[name][k] != listed[name].get(k)]
            if diff:
                raise DataError(f"{d / name}: {' and '.join(diff)} differ from the manifest: the shard was modified or is corrupt")
        if (got["docs"], got["tokens"]) != (want.get("docs"), want.get("tokens")):
            raise DataError(f"{d}: {split} has {got['docs']} docs / {got['tokens']} tokens, the manifest says {want.get('docs')} / {want.get('tokens')}")
    stream = _val_stream(d)
    if hashlib.sha256(stream.tobytes()).hexdigest() != m.get("val_sha256") or stream.size != m.get("val_tokens"):
        raise DataError(f"{d}: val stream does not match the manifest's val_sha256 / val_tokens")
    side, want_side = _sidecar(d, m["splits"]["val"]["shards"]), m.get("val_byte_sidecar")
    if (side is None) != (want_side is None):
        raise DataError(f"{d}: " + ("fineweb_val_bytes_*.bin on disk but no byte sidecar in the manifest" if want_side is None
                                    else "the manifest lists a CaseOps byte sidecar but no fineweb_val_bytes_*.bin is here"))
    if side is not None and (side[0] != want_side.get("shards") or int(side[1][1:].sum(dtype=np.int64)) != m.get("val_bytes")):
        raise DataError(f"{d}: byte sidecar shards or their byte total differ from the manifest: modified or corrupt; re-create it")
    tok, note = Path(m["tokenizer"]["path"]), "not found here, not checked"
    if tok.is_file():
        if sha256_file(tok) != m["tokenizer"]["sha256"]:
            raise DataError(f"{tok}: sha256 differs from the manifest: not the tokenizer these shards were made with")
        note = "ok"
    v, t = m["splits"]["val"], m["splits"]["train"]
    return (f"ok: {d}: val {len(v['shards'])} shard(s) {v['tokens']} tokens {v['docs']} docs, "
            f"train {len(t['shards'])} shard(s) {t['tokens']} tokens; tokenizer {tok}: {note}"
            + (f"; CaseOps byte sidecar {len(side[0])} shard(s) {m['val_bytes']} bytes" if side else ""))


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


def check_dataset(data_path, tokenizer_path, vocab_size: int, bos_id: int, val_tokens: np.ndarray, train_files,
                  check_train_shards: int = 1, record_mode: bool = False) -> list[str]:
    """Run by train_gpt.py at start: fail on a dataset that would make the score wrong (val
    count/hash or tokenizer differ from the manifest, a shard in both splits, val documents inside the
    first train shards). Returns log lines."""
    lines, root = [], Path(data_path)
    mpath = root / "manifest.json"
    val_sha = hashlib.sha256(val_tokens.tobytes()).hexdigest()
    lines.append(f"dataset_fingerprint:val_sha256={val_sha[:16]} val_tokens:{val_tokens.size}")
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
            splits = m["splits"]
        except (ValueError, KeyError) as e:
            raise DataError(f"{mpath}: unreadable manifest ({e}); re-run `python data/prepare.py index {root} --tokenizer {tokenizer_path}`") from None
        if int(m.get("vocab_size", vocab_size)) != vocab_size or int(m.get("bos_id", bos_id)) != bos_id:
            raise DataError(f"{mpath}: dataset vocab_size/bos_id {m.get('vocab_size')}/{m.get('bos_id')} != tokenizer's {vocab_size}/{bos_id}")
        tok_sha = m.get("tokenizer", {}).get("sha256")
        if tok_sha and tok_sha != hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest():
            raise DataError(
                f"{tokenizer_path} is not the tokenizer these shards were made with (sha256 differs from {mpath}): "
                "val_bpb would count the wrong bytes; point tokenizer_path at the dataset's tokenizer"
            )
        if int(m.get("val_tokens", val_tokens.size)) != val_tokens.size:
            raise DataError(
                f"{root}: val shards hold {val_tokens.size} tokens but the manifest says {m['val_tokens']}: "
                "val split is not the one the manifest describes; re-download or re-prepare it"
            )
        if m.get("val_sha256") and m["val_sha256"] != val_sha:
            raise DataError(f"{root}: val tokens do not match the manifest's val_sha256: corrupt or replaced val shards")
        side = [load_shard(f) for f in shards_on_disk(root, "val_bytes")]  # CaseOps: val_bpb's denominator, checked like the tokens
        side_sha = hashlib.sha256(np.concatenate(side).tobytes()).hexdigest() if side else None
        if side_sha != m.get("val_byte_sidecar", {}).get("sha256"):
            raise DataError(f"{root}: the CaseOps byte sidecar (fineweb_val_bytes_*.bin) does not match {mpath}: re-create the dataset")
        names = {s: {d["file"] for d in splits.get(s, {}).get("shards", [])} for s in ("val", "train")}
        hashes = {s: {d.get("sha256") for d in splits.get(s, {}).get("shards", [])} - {None} for s in ("val", "train")}
        if names["val"] & names["train"] or hashes["val"] & hashes["train"]:
            raise DataError(f"{mpath}: a shard appears in both the train and val splits")
        lines.append(f"dataset_manifest:{mpath} val_docs:{splits['val'].get('docs')} val_bytes:{m.get('val_bytes')}")
    else:  # nothing to check the val split and tokenizer against: a record needs it
        fix = f"write one with `python3 data/prepare.py index {root} --tokenizer {tokenizer_path}`"
        if record_mode:
            raise DataError(f"{mpath} missing: record_mode needs the manifest to verify the val split and tokenizer; {fix}")
        lines.append(f"WARNING: dataset_manifest:none - {mpath} missing: val shards and tokenizer NOT verified; {fix}")
    if check_train_shards > 0:
        vh = doc_hashes(val_tokens, bos_id)
        th = np.concatenate([doc_hashes(load_shard(f), bos_id) for f in train_files[: check_train_shards]])
        hit = np.isin(vh, th)  # a few exact duplicates are normal in web text; a leak is many
        if hit.sum() > max(5, 0.02 * vh.size):
            raise DataError(
                f"{root}: {int(hit.sum())}/{vh.size} val documents also occur in the first "
                f"{check_train_shards} train shard(s): train/val leak; rebuild the shards with disjoint splits"
            )
        lines.append(f"dataset_disjoint:val_docs_in_train={int(hit.sum())}/{vh.size} train_shards_checked:{min(len(train_files), check_train_shards)}")
    return lines


# -----------------------------------------------------------------------------
# documents: text files, Hugging Face datasets, the built-in sample


def split_text_documents(text: str) -> list[str]:
    """A .txt file holds documents separated by blank lines."""
    return [d for d in re.split(r"\n\s*\n", text) if d.strip()]


def iter_file_documents(paths, text_field: str = "text") -> Iterator[str]:
    def not_text(p, line: int, e: UnicodeDecodeError) -> ValueError:  # a binary file: say which file and line
        return ValueError(f"{p}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); give UTF-8 .txt or .jsonl files")

    for p in map(Path, paths):
        if p.suffix != ".jsonl":
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise not_text(p, p.read_bytes().count(b"\n", 0, e.start) + 1, e) from None
            yield from split_text_documents(text)
            continue
        with open(p, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise not_text(p, i, e) from None
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f"{p}:{i}: expected a JSON object with a string {text_field!r} field")
                yield text


def iter_hf_documents(name: str, config_name=None, split="train", data_files=None, text_field="text", max_docs=None) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(name, config_name, split=split, data_files=data_files, streaming=True)
    for i, row in enumerate(itertools.islice(ds, max_docs)):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"hf:{name} row {i}: no string {text_field!r} field (columns: {sorted(row)})")
        yield text


def sample_documents(max_chars: int = 2000) -> list[str]:
    """Python's bundled help topics as documents: paragraphs grouped up to ~max_chars, sorted topic keys."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        group, size = [], 0
        for para in split_text_documents(topics[key]):
            if group and size + 2 + len(para) > max_chars:
                docs.append("\n\n".join(group))
                group, size = [], 0
            group.append(para)
            size += len(para) + (2 if size else 0)
        if group:
            docs.append("\n\n".join(group))
    return docs


# -----------------------------------------------------------------------------
# pipeline: documents -> (tokenizer) -> shards -> manifest


def _proto_fields(b: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints and length-delimited fields, fixed ones skipped.
    Enough for sentencepiece's SentencePieceText without the protobuf package."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        kind = key & 7
        if kind == 0:
            v, i = _varint(b, i)
        elif kind == 2:
            n, i = _varint(b, i)
            v, i = b[i : i + n], i + n
        else:  # 1 = 64-bit, 5 = 32-bit (scores)
            v, i = None, i + (8 if kind == 1 else 4)
        yield key >> 3, v


def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while b[i] & 0x80:
        v, shift, i = v | (b[i] & 0x7F) << shift, shift + 7, i + 1
    return v | b[i] << shift, i + 1


def caseops_tokens(sp, encoded: str) -> tuple[list[int], np.ndarray]:
    """ids of one CaseOps-encoded document and the sidecar entries of [BOS] + ids: each token gets the original
    UTF-8 bytes (caseops.original_bytes) from the end of the previous token's span to the end of its own, so the
    whitespace the normalizer absorbs or drops (a document's leading and trailing whitespace) is counted once,
    on the token next to it, and the entries sum to the original document's UTF-8 length. A document with no
    tokens (empty, or whitespace only) puts its bytes on its BOS."""
    ids, ends = [], []
    for field, piece in _proto_fields(sp.encode(encoded, out_type="serialized_proto")):
        if field == 2:  # SentencePieceText.pieces: id = 2, end = 5 (a byte offset into `encoded`)
            f = dict(_proto_fields(piece))
            ids.append(f.get(2, 0))
            ends.append(f.get(5, 0))
    cum = np.concatenate([[0], np.cumsum(caseops.original_bytes(encoded))])
    if not ids:
        return ids, cum[-1:]
    ends = np.maximum.accumulate(ends)
    ends[-1] = cum.size - 1
    return ids, np.diff(cum[np.concatenate([[0, 0], ends])])


def export_shards(docs: Iterable[str], sp, out_dir, val_docs: int, shard_tokens: int = SHARD_TOKENS, caseops_on: bool = False) -> int:
    """Write [BOS]+ids per document: the first val_docs to val shards, the rest to train. Returns the doc count.
    caseops_on: documents are CaseOps-encoded first, and the val byte sidecar is written in the val shards' layout."""
    writer, side, bos, n = ShardWriter(out_dir, shard_tokens), ShardWriter(out_dir, shard_tokens), int(sp.bos_id()), 0
    writer.start_split("val")
    side.start_split("val_bytes")
    docs = iter(tqdm(docs, desc="export", unit="doc", disable=None))
    while batch := list(itertools.islice(docs, 512)):
        if caseops_on:
            batch = [caseops.encode(t) for t in batch]
        for j, ids in enumerate(sp.encode(batch, out_type=int)):
            if n == val_docs:
                writer.start_split("train")  # flushes: the splits never share a shard
            if caseops_on and n < val_docs:
                ids, nbytes = caseops_tokens(sp, batch[j])
                if nbytes.max() > MAX_VOCAB - 1:
                    raise ValueError(f"val document {n}: one token stands for {int(nbytes.max())} bytes, more than a uint16 sidecar holds")
                side.add(nbytes)
            writer.add(np.array([bos, *ids], dtype=np.int64))
            n += 1
    writer.flush()
    side.flush()
    if n == 0:
        raise ValueError("no documents in the input")
    if n <= val_docs:
        raise ValueError(f"val docs {val_docs} >= total docs {n}: leave at least one document for train")
    return n


def build_dataset(docs: Callable[[], Iterable[str]], out, val_docs: int, source: str, tokenizer=None, vocab_size=None,
                  tokenizer_dir="data/tokenizers", name="custom", shard_tokens=SHARD_TOKENS, force=False,
                  tokenizer_train_docs=None, caseops_on=False) -> dict:
    """Shards + manifest from a re-iterable document source (docs() is called once per pass).
    Reuses `tokenizer` or trains one at `vocab_size`. On any error nothing new is left behind.
    caseops_on: CaseOps data (tokenizer trained on encoded text with the operators reserved, val byte sidecar)."""
    import sentencepiece as spm

    out = Path(out)
    if val_docs < 1:
        raise ValueError(f"val docs must be >= 1 (got {val_docs})")
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give exactly one of --tokenizer MODEL (reuse) or --vocab-size V (train)")
    old = shards_on_disk(out, "val") + shards_on_disk(out, "train") + shards_on_disk(out, "val_bytes")
    if old and not force:
        raise ValueError(f"{out} already holds {len(old)} shard(s); pass --force to replace them")
    model = None
    if tokenizer is not None:
        model_path, sp = Path(tokenizer), check_caseops_tokenizer(load_sp(tokenizer), tokenizer, caseops_on)
    else:
        model_path = Path(tokenizer_dir) / f"{name}_{vocab_size}_bpe{'_caseops' if caseops_on else ''}.model"
        if model_path.exists() and not force:
            raise ValueError(f"{model_path} exists; reuse it with --tokenizer {model_path}, pick another --name, or pass --force")
        texts = tqdm(map(caseops.encode, docs()) if caseops_on else docs(), desc="tokenizer", unit="doc", disable=None)
        model = train_tokenizer(itertools.islice(texts, tokenizer_train_docs), vocab_size, caseops_on)
        sp = check_sp(spm.SentencePieceProcessor(model_proto=model), model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        export_shards(docs(), sp, stage, val_docs, shard_tokens, caseops_on)
        if model is not None:
            save_tokenizer(model, model_path)
        out.mkdir(exist_ok=True)
        for f in old + [out / "manifest.json"]:
            f.unlink(missing_ok=True)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return build_manifest(out, model_path, source)


def sample_dir(out_root, vocab_size: int, caseops_on: bool = False) -> Path:
    return Path(out_root) / "datasets" / f"sample{'_caseops' if caseops_on else ''}_sp{vocab_size}"


def build_sample(out_root="data", vocab_size: int = 512, val_docs=None, force=False, shard_tokens=SHARD_TOKENS, caseops_on=False) -> dict:
    """The offline sample: <out_root>/datasets/sample_sp<V>/ and <out_root>/tokenizers/sample_<V>_bpe.model
    (caseops_on: sample_caseops_sp<V>/ and sample_<V>_bpe_caseops.model)."""
    docs = sample_documents()
    return build_dataset(
        lambda: iter(docs), sample_dir(out_root, vocab_size, caseops_on), val_docs or max(1, len(docs) // 10), "sample",
        vocab_size=vocab_size, tokenizer_dir=Path(out_root) / "tokenizers", name="sample", shard_tokens=shard_tokens, force=force,
        caseops_on=caseops_on,
    )


# -----------------------------------------------------------------------------
# download: the official cached shards


def hub_fetcher(repo_id: str, remote_root: str = "datasets") -> Callable[[str], tuple[Path, bool]]:
    """fetch(relative path) -> (local source file, may hard-link). A local directory stands in for the hub."""
    root = remote_root.strip("/")

    def remote(rel: str) -> str:
        return f"{root}/{rel}" if root else rel

    if Path(repo_id).is_dir():
        def fetch(rel: str) -> tuple[Path, bool]:
            src = Path(repo_id) / remote(rel)
            if not src.is_file():
                raise DataError(f"{src}: not found in the local remote {repo_id}")
            return src, False
        return fetch

    from huggingface_hub import hf_hub_download

    def fetch(rel: str) -> tuple[Path, bool]:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=remote(rel), repo_type="dataset")).resolve(), True
        except Exception as e:  # network / hub errors come in many classes; report them as one line
            raise DataError(f"{repo_id}: download of {remote(rel)} failed ({type(e).__name__}: {e})") from None
    return fetch


def _place(src: Path, dest: Path, link: bool) -> None:
    """Hard-link (hub cache) or copy src to dest, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        if link:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or no hard links
                link = False
        if not link:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(variant="sp1024", train_shards=80, repo_id=None, remote_root="datasets", out_root="data", fetch=None) -> dict:
    """All val shards + train shards 0..N-1 + the tokenizer into <out_root>/{datasets,tokenizers}/, then manifest.json."""
    if not re.fullmatch(r"sp\d+", variant) or (repo_id is None and variant not in DEFAULT_REPOS):
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(DEFAULT_REPOS)} (or give --repo-id)")
    if train_shards < 0:
        raise ValueError(f"--train-shards must be >= 0 (got {train_shards})")
    repo_id = repo_id or DEFAULT_REPOS[variant]
    fetch = fetch or hub_fetcher(repo_id, remote_root)
    src = fetch("manifest.json")[0]
    try:
        remote = json.loads(Path(src).read_text())
        entries, tokenizers = ({x["name"]: x for x in remote[k]} for k in ("datasets", "tokenizers"))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{src}: unreadable remote manifest ({type(e).__name__}: {e})") from None
    name = f"fineweb10B_{variant}"
    if name not in entries:
        raise DataError(f"{repo_id}: no dataset {name} (it has: {', '.join(entries) or 'none'})")
    entry, stats = entries[name], entries[name].get("stats", {})
    tok = tokenizers.get(entry.get("tokenizer_name"), {})
    if "model_path" not in tok or not {"files_val", "files_train"} <= stats.keys():
        raise DataError(f"{src}: {name} lacks stats.files_val/files_train or a tokenizer with a model_path")
    n_val, n_train = int(stats["files_val"]), int(stats["files_train"])
    if train_shards > n_train:
        raise ValueError(f"--train-shards {train_shards} > {n_train}: {repo_id} publishes only {n_train} train shards of {name}")
    out_root = Path(out_root)
    ds_dir, tok_dir, remote_ds = out_root / "datasets" / name, out_root / "tokenizers", entry.get("path") or f"datasets/{name}"
    jobs = [(f"{remote_ds}/{shard_name('val', i)}", ds_dir / shard_name("val", i)) for i in range(n_val)]
    jobs += [(f"{remote_ds}/{shard_name('train', i)}", ds_dir / shard_name("train", i)) for i in range(train_shards)]
    jobs += [(tok[k], tok_dir / Path(tok[k]).name) for k in ("model_path", "vocab_path") if tok.get(k)]
    for rel, dest in tqdm(jobs, desc=f"download {name}", unit="file", disable=None):
        is_shard = dest.suffix == ".bin"
        if is_shard and dest.is_file():
            try:
                read_shard_header(dest)
                continue  # present and valid
            except DataError:
                pass  # broken local copy: fetch it again
        src, link = fetch(rel)
        if is_shard:
            read_shard_header(src)  # a 0-byte or truncated remote file fails here, naming it
        _place(src, dest, link)
    return build_manifest(ds_dir, tok_dir / Path(tok["model_path"]).name, f"download:{repo_id}")


# -----------------------------------------------------------------------------
# CLI


def run(a) -> str:
    """Run one parsed subcommand; return its one-line summary."""
    if a.cmd == "verify":
        return verify(a.dir)
    if a.cmd == "index":
        try:
            old = read_manifest(a.dir)
        except DataError:
            old = {}
        tokenizer = a.tokenizer or old.get("tokenizer", {}).get("path")
        if not tokenizer:
            raise ValueError(f"{a.dir}: no manifest.json to take the tokenizer from; pass --tokenizer MODEL")
        m, where = build_manifest(a.dir, tokenizer, a.source or old.get("source") or "index"), a.dir
    elif a.cmd == "download":
        m = download(a.variant, a.train_shards, a.repo_id, a.remote_root, a.out_root)
        where = Path(a.out_root) / "datasets" / f"fineweb10B_{a.variant}"
    elif a.cmd == "sample":
        where = sample_dir(a.out_root, a.vocab_size, a.caseops)
        if (where / "manifest.json").is_file() and not a.force:
            return f"sample: already prepared, {verify(where)}"  # deterministic, so re-running is a no-op
        m = build_sample(a.out_root, a.vocab_size, a.val_docs, a.force, a.shard_tokens, a.caseops)
    else:  # text / hf
        if a.cmd == "text":
            missing = [f for f in a.files if not Path(f).is_file()]
            if missing:
                raise ValueError(f"input file {missing[0]} not found")
            docs, source = (lambda: iter_file_documents(a.files, a.text_field)), "text"
        else:
            docs = lambda: iter_hf_documents(a.name, a.config_name, a.split, a.data_files, a.text_field, a.max_docs)  # noqa: E731
            source = f"hf:{a.name}"
        m = build_dataset(docs, a.out, a.val_docs, source, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                          tokenizer_dir=a.tokenizer_dir, name=a.name_prefix, shard_tokens=a.shard_tokens, force=a.force,
                          tokenizer_train_docs=a.tokenizer_train_docs, caseops_on=a.caseops)
        where = a.out
    v, t = m["splits"]["val"], m["splits"]["train"]
    return (f"{m['source']}: {where}: val {v['docs']} docs {v['tokens']} tokens, train {t['docs']} docs {t['tokens']} tokens, "
            f"val_bytes {m['val_bytes']}{' (CaseOps sidecar: original text)' if m['caseops'] else ''}, vocab {m['vocab_size']}, "
            f"tokenizer {m['tokenizer']['path']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("download", help="official cached shards from the Hugging Face hub")
    d.add_argument("--variant", default="sp1024", help=f"one of {', '.join(DEFAULT_REPOS)}")
    d.add_argument("--train-shards", type=int, default=80)
    d.add_argument("--repo-id", help="HF dataset repo, or a local directory laid out like it")
    d.add_argument("--remote-root", default="datasets")
    d.add_argument("--out-root", default="data")

    def pipeline_args(q):
        tok = q.add_mutually_exclusive_group(required=True)
        tok.add_argument("--tokenizer", help="reuse this SentencePiece .model")
        tok.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size (official settings)")
        q.add_argument("--val-docs", type=int, required=True, help="the first N documents form the val split (the challenge's val set: 50000)")
        q.add_argument("--out", required=True, help="dataset dir for the shards and manifest.json")
        q.add_argument("--tokenizer-dir", default="data/tokenizers")
        q.add_argument("--name", dest="name_prefix", default="custom", help="trained tokenizer: <tokenizer-dir>/<name>_<V>_bpe.model")
        q.add_argument("--tokenizer-train-docs", type=int, help="train the tokenizer on the first N documents only")
        q.add_argument("--text-field", default="text")
        q.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
        q.add_argument("--force", action="store_true", help="replace existing shards / tokenizer")
        q.add_argument("--caseops", action="store_true", help=CASEOPS_HELP)

    t = sub.add_parser("text", help="shards from .txt (blank-line separated) and .jsonl files")
    t.add_argument("files", nargs="+")
    pipeline_args(t)

    h = sub.add_parser("hf", help="shards from a Hugging Face dataset (streamed)")
    h.add_argument("name")
    h.add_argument("--config-name")
    h.add_argument("--split", default="train")
    h.add_argument("--data-files", nargs="+")
    h.add_argument("--max-docs", type=int)
    pipeline_args(h)

    s = sub.add_parser("sample", help="built-in offline corpus (Python's help topics), seconds to build")
    s.add_argument("--vocab-size", type=int, default=512)
    s.add_argument("--val-docs", type=int, help="default: 10%% of the documents")
    s.add_argument("--out-root", default="data")
    s.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    s.add_argument("--force", action="store_true")
    s.add_argument("--caseops", action="store_true", help=CASEOPS_HELP)

    i = sub.add_parser("index", help="write manifest.json for existing shards")
    i.add_argument("dir")
    i.add_argument("--tokenizer", help="default: the path in the existing manifest.json")
    i.add_argument("--source", help="default: the existing manifest's source, else 'index'")

    v = sub.add_parser("verify", help="re-hash shards against manifest.json")
    v.add_argument("dir")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        print(run(args))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
