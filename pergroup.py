"""pergroup.py: the per-group artifact compressor of PR #1855 (spec sota-1855 section 3.6), for quantize.py's
pack() containers (u32 n | JSON head | raw tensor bytes), exact and pickle-free.

Body = b"PGRP" | u32 9 | 9 x u32 stream length | streams. Streams 0-6: the 2-D int8 ".q" tensors of one role
each (ROLES order; container order, which is layer order), the rows of the SORTED roles reordered by a greedy L1
chain, each matrix written transposed (C order of W.T), compressed by zpaq or ppmd (a context-mixing / PPM coder:
the role blobs are most of the bytes). Stream 7: brotli of the container's JSON head + every other tensor byte
(byte-shuffled: fp16 scales, passthrough floats, gate and LQER ints). Stream 8: brotli of the uint16 row orders.
"""
from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROLES = (".tok_emb.", ".attn.c_k.", ".attn.c_q.", ".attn.c_v.", ".attn.proj.", ".mlp.fc.", ".mlp.proj.")
SORTED = (0, 2, 5)  # tok_emb, Q, MLP up: the roles whose row similarity the record exploits
PPMD_MEM = 256 << 20


def _lib(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"the pergroup compressor needs the {module} package: pip install {module}") from None


def l1_chain(q) -> np.ndarray:
    """Greedy nearest-neighbour row order of an int matrix: row 0 first, then always the unused row with the
    smallest L1 distance to the last one (ties: lowest index). One vectorised pass over the unused rows a step."""
    q = np.asarray(q)
    n = len(q)
    X = q.astype(np.int8 if np.abs(q.astype(np.int16)).max(initial=0) <= 63 else np.int16)  # |a-b| <= 126 fits int8
    idx, buf, order = np.arange(n, dtype=np.int64), np.empty_like(X), np.empty(n, dtype=np.int64)
    m, cur = n, 0
    for i in range(n):
        order[i], row = idx[cur], X[cur].copy()
        m -= 1
        X[cur], idx[cur] = X[m], idx[m]  # swap-remove: the unused rows stay X[:m], their indices idx[:m]
        if m:
            np.abs(np.subtract(X[:m], row, out=buf[:m]), out=buf[:m])
            cur = int((buf[:m].sum(1, dtype=np.int32).astype(np.int64) * n + idx[:m]).argmin())  # int32: 1.7x faster than int64
    return order


def _roles(head: dict) -> list[list[tuple[str, dict]]]:
    roles = [[] for _ in ROLES]
    for name, d in head["tensors"].items():
        if d["dtype"] == "int8" and len(d["shape"]) == 2 and name.endswith(".q"):
            i = next((i for i, pat in enumerate(ROLES) if pat in "." + name), None)
            if i is not None:
                roles[i].append((name, d))
    return roles


def _sorted(i: int, d: dict) -> bool:
    return i in SORTED and d["shape"][0] <= 65536  # row orders are stored as uint16


def _by_offset(head: dict):
    return sorted(head["tensors"].items(), key=lambda kv: kv[1]["offset"])


def _cm(blob: bytes, backend: str, level: int) -> bytes:
    if not blob:
        return b""
    if backend == "zpaq":
        return b"z" + _lib("zpaq").compress(blob, level=level)
    return b"p" + bytes([level]) + _lib("pyppmd").compress(blob, max_order=level, mem_size=PPMD_MEM)


def _uncm(b: bytes) -> bytes:
    if b[:1] == b"z":
        return _lib("zpaq").decompress(b[1:])
    if b[:1] == b"p":
        return _lib("pyppmd").decompress(b[2:], max_order=b[1], mem_size=PPMD_MEM)
    if b:
        raise ValueError("unknown back-end tag")
    return b""


def _shuffle(b: bytes) -> bytes:  # = quantize.byte_shuffle (this module imports nothing of the toolkit)
    return b[0::2] + b[1::2]


def _unshuffle(b: bytes) -> bytes:
    out, half = bytearray(len(b)), (len(b) + 1) // 2
    out[0::2], out[1::2] = b[:half], b[half:]
    return bytes(out)


def encode(container: bytes, backend: str = "zpaq", level: int = 5) -> bytes:
    (n,) = struct.unpack_from("<I", container, 0)
    head, data = json.loads(container[4 : 4 + n]), memoryview(container)[4 + n :]
    mat = lambda d: np.frombuffer(data[d["offset"] : d["offset"] + d["nbytes"]], dtype=np.int8).reshape(d["shape"])  # noqa: E731
    roles = _roles(head)

    def role_stream(i: int) -> tuple[bytes, list]:
        orders = [l1_chain(mat(d)) if _sorted(i, d) else None for _, d in roles[i]]
        blob = b"".join(mat(d)[slice(None) if o is None else o].T.tobytes() for (_, d), o in zip(roles[i], orders))
        return _cm(blob, backend, level), [o for o in orders if o is not None]
    with ThreadPoolExecutor(4) as ex:
        done = list(ex.map(role_stream, range(len(ROLES))))
    in_role = {name for r in roles for name, _ in r}
    rest = b"".join(data[d["offset"] : d["offset"] + d["nbytes"]] for name, d in _by_offset(head) if name not in in_role)
    perms = b"".join(o.astype("<u2").tobytes() for _, orders in done for o in orders)
    brotli = _lib("brotli")
    streams = [s for s, _ in done] + [brotli.compress(container[: 4 + n] + _shuffle(rest), quality=11, lgwin=24),
                                      brotli.compress(perms, quality=11)]
    return b"PGRP" + struct.pack(f"<{len(streams) + 1}I", len(streams), *map(len, streams)) + b"".join(streams)


def decode(body: bytes) -> bytes:
    """The exact container encode() was given; anything damaged is one ValueError line."""
    try:
        k = len(ROLES) + 2
        if body[:4] != b"PGRP" or struct.unpack_from("<I", body, 4)[0] != k:
            raise ValueError("bad magic or stream count")
        lens = struct.unpack_from(f"<{k}I", body, 8)
        cuts = np.cumsum((8 + 4 * k, *lens)).tolist()
        if cuts[-1] != len(body):
            raise ValueError("stream lengths do not add up to the body")
        streams = [body[a:b] for a, b in zip(cuts, cuts[1:])]
        meta = _lib("brotli").decompress(streams[-2])
        (n,) = struct.unpack_from("<I", meta, 0)
        head, rest = json.loads(meta[4 : 4 + n]), _unshuffle(meta[4 + n :])
        with ThreadPoolExecutor(4) as ex:
            blobs = list(ex.map(_uncm, streams[: len(ROLES)]))
        perms, pp, mats = np.frombuffer(_lib("brotli").decompress(streams[-1]), dtype="<u2"), 0, {}
        for i, role in enumerate(_roles(head)):
            bp = 0
            for name, d in role:
                r, c = d["shape"]
                m = np.frombuffer(blobs[i], dtype=np.int8, count=r * c, offset=bp).reshape(c, r).T
                bp += r * c
                if _sorted(i, d):
                    out, o = np.empty_like(m), perms[pp : pp + r].astype(np.int64)
                    out[o], m, pp = m, out, pp + r
                mats[name] = np.ascontiguousarray(m).tobytes()
            if bp != len(blobs[i]):
                raise ValueError(f"role stream {i} holds {len(blobs[i]) - bp} bytes more than its tensors")
        pieces, rp = [], 0
        for name, d in _by_offset(head):
            pieces.append(mats[name] if name in mats else rest[rp : rp + d["nbytes"]])
            rp += 0 if name in mats else d["nbytes"]
        if rp != len(rest) or pp != len(perms):
            raise ValueError("the rest or the row-order stream has the wrong length")
        return meta[: 4 + n] + b"".join(pieces)
    except Exception as e:
        raise ValueError(f"pergroup stream is corrupt ({type(e).__name__}: {e}); re-create the artifact") from None
