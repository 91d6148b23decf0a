"""quantize.py: the artifact - per-row int quantization, compression, a safe container, code bytes.

Artifact file = MAGIC | u16 version | u8 n | compressor name | u32 crc32 | u64 container length |
compressed container. Container = u32 n | JSON header (config, tensor table, per-entry scheme) |
raw tensor bytes. No pickle anywhere: loading an artifact cannot execute code.

CLI: python quantize.py CHECKPOINT [--scheme int8] [--compressor zlib] [--out PATH]
"""
from __future__ import annotations

import json
import lzma
import os
import struct
import sys
import zlib
from pathlib import Path

import torch
from torch import Tensor

MAGIC = b"PGOLFQ"
FORMAT_VERSION = 1
CODE_FILES = ("train_gpt.py", "quantize.py", "ttt_eval.py")
KEEP_FLOAT_MAX_NUMEL = 65_536  # tensors this small are stored as floats, not quantized
INT8_CLIP_Q = 0.9999984  # per-row clip quantile of the official baseline

DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
              torch.int16, torch.int32, torch.int64, torch.bool)
}


class ArtifactError(ValueError):
    """The artifact file is missing, foreign, corrupt or truncated."""


# -----------------------------------------------------------------------------
# Compression: the name is stored in the artifact, so reading needs no flag.


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ArtifactError("compressor zstd needs the zstandard package: pip install zstandard") from None
    return zstandard


def _brotli():
    try:
        import brotli
    except ImportError:
        raise ArtifactError("compressor brotli needs the brotli package: pip install brotli") from None
    return brotli


COMPRESSORS = {
    "zlib": (lambda b: zlib.compress(b, 9), zlib.decompress),
    "lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "zstd": (lambda b: _zstd().ZstdCompressor(level=22).compress(b), lambda b: _zstd().ZstdDecompressor().decompress(b)),
    "brotli": (lambda b: _brotli().compress(b, quality=11), lambda b: _brotli().decompress(b)),
}


def compress(data: bytes, name: str) -> bytes:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor '{name}'; choose one of {', '.join(COMPRESSORS)}")
    return COMPRESSORS[name][0](data)


def decompress(data: bytes, name: str) -> bytes:
    if name not in COMPRESSORS:
        raise ArtifactError(f"artifact uses unknown compressor '{name}'")
    return COMPRESSORS[name][1](data)


# -----------------------------------------------------------------------------
# Quantization


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Official baseline int8: per-row clip at the 99.99984th percentile of |w|, scale = clip/127
    floored at 1/127 (so rows with |w| < 1 share one fixed grid step), fp16 scales."""
    w = w.float()
    clip = torch.quantile(w.abs(), INT8_CLIP_Q, dim=1) if w.numel() else w.new_zeros(w.size(0))
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    q = torch.clamp(torch.round(torch.clamp(w, -clip[:, None], clip[:, None]) / scale[:, None]), -127, 127)
    return q.to(torch.int8), scale.to(torch.float16)


def quantize_state_dict(state: dict[str, Tensor], scheme: str = "int8", control_patterns: str = "") -> tuple[dict, dict]:
    """-> (tensors to store, {name: entry}) where an entry says how to rebuild the original tensor."""
    if scheme != "int8":
        raise ValueError(f"unknown quant scheme '{scheme}' (this build supports: int8)")
    control = [s for s in control_patterns.split(",") if s]
    tensors, entries = {}, {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if not t.is_floating_point():
            tensors[name], entries[name] = t, {"scheme": "raw", "dtype": dtype}
        elif t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            keep32 = any(c in name for c in control)
            tensors[name] = t.float() if keep32 else t.half()
            entries[name] = {"scheme": "float", "dtype": dtype}
        elif t.ndim == 2:
            tensors[name + ".q"], tensors[name + ".scale"] = quantize_rows_int8(t)
            entries[name] = {"scheme": "int8_row", "dtype": dtype}
        else:
            flat = t.float().reshape(-1)
            clip = torch.quantile(flat.abs(), INT8_CLIP_Q).clamp_min(1e-12) if flat.numel() <= 2**24 else flat.abs().max()
            scale = clip / 127.0
            tensors[name + ".q"] = torch.clamp(torch.round(t.float() / scale), -127, 127).to(torch.int8)
            tensors[name + ".scale"] = scale.reshape(1).float()
            entries[name] = {"scheme": "int8_tensor", "dtype": dtype}
    return tensors, entries


def dequantize_state_dict(tensors: dict[str, Tensor], entries: dict) -> dict[str, Tensor]:
    out = {}
    for name, e in entries.items():
        dtype = DTYPES[e["dtype"]]
        if e["scheme"] in ("raw", "float"):
            out[name] = tensors[name].to(dtype)
        elif e["scheme"] == "int8_row":
            out[name] = (tensors[name + ".q"].float() * tensors[name + ".scale"].float()[:, None]).to(dtype)
        elif e["scheme"] == "int8_tensor":
            out[name] = (tensors[name + ".q"].float() * tensors[name + ".scale"].float()).to(dtype)
        else:
            raise ArtifactError(f"artifact entry {name} has unknown scheme '{e['scheme']}'")
    return out


# -----------------------------------------------------------------------------
# Container


def pack(tensors: dict[str, Tensor], header: dict) -> bytes:
    table, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        table[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset, "nbytes": len(b)}
        blobs.append(b)
        offset += len(b)
    head = json.dumps({**header, "tensors": table}, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def unpack(buf: bytes) -> tuple[dict[str, Tensor], dict]:
    (n,) = struct.unpack_from("<I", buf, 0)
    header = json.loads(buf[4 : 4 + n])
    base, tensors = 4 + n, {}
    for name, d in header.pop("tensors").items():
        dtype, start = DTYPES[d["dtype"]], base + d["offset"]
        raw = bytearray(buf[start : start + d["nbytes"]])
        if len(raw) != d["nbytes"]:
            raise ArtifactError(f"tensor {name} runs past the end of the container")
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(d["shape"])
    return tensors, header


def write_artifact(path, state: dict[str, Tensor], config: dict, scheme: str = "int8", compressor: str = "zlib",
                   control_patterns: str = "") -> dict:
    """Quantize, pack, compress and atomically write; returns byte statistics."""
    tensors, entries = quantize_state_dict(state, scheme, control_patterns)
    container = pack(tensors, {"format_version": FORMAT_VERSION, "scheme": scheme, "config": config, "entries": entries})
    body = compress(container, compressor)
    name = compressor.encode()
    blob = MAGIC + struct.pack("<HB", FORMAT_VERSION, len(name)) + name + struct.pack("<IQ", zlib.crc32(body), len(container)) + body
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    raw = sum(t.numel() * t.element_size() for t in state.values())
    return {"artifact_bytes": len(blob), "payload_bytes": payload, "container_bytes": len(container),
            "payload_ratio": raw / max(payload, 1), "compressor": compressor, "scheme": scheme}


def read_artifact(path) -> tuple[dict[str, Tensor], dict, dict]:
    """-> (dequantized state dict, training config, header). Raises ArtifactError with a clear reason."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"artifact {p} not found")
    blob = p.read_bytes()
    if not blob.startswith(MAGIC):
        raise ArtifactError(f"{p} is not a Parameter Golf artifact (bad magic)")
    try:
        version, n = struct.unpack_from("<HB", blob, len(MAGIC))
        pos = len(MAGIC) + 3
        name = blob[pos : pos + n].decode()
        crc, length = struct.unpack_from("<IQ", blob, pos + n)
        body = blob[pos + n + 12 :]
    except (struct.error, UnicodeDecodeError):
        raise ArtifactError(f"{p} is truncated (header incomplete)") from None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{p} has artifact format version {version}; this quantize.py reads version {FORMAT_VERSION}")
    if zlib.crc32(body) != crc:
        raise ArtifactError(f"{p} is corrupt or truncated (checksum mismatch); re-copy or re-create it")
    try:
        container = decompress(body, name)
        if len(container) != length:
            raise ValueError("length mismatch")
        tensors, header = unpack(container)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{p} could not be decoded ({type(e).__name__}: {e}); it is corrupt") from None
    return dequantize_state_dict(tensors, header["entries"]), header["config"], header


# -----------------------------------------------------------------------------
# Code bytes: the files a record ships to run count toward the 16,000,000-byte cap.


def code_size(root) -> tuple[int, str]:
    sizes = {f: (Path(root) / f).stat().st_size for f in CODE_FILES if (Path(root) / f).is_file()}
    return sum(sizes.values()), " ".join(f"{k}:{v}" for k, v in sizes.items())


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Quantize a raw checkpoint into an artifact and report its size.")
    ap.add_argument("checkpoint", help="final_model.pt or ckpt_stepN.pt written by train_gpt.py")
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--compressor", default="zlib", choices=sorted(COMPRESSORS))
    ap.add_argument("--out", default=None, help="artifact path (default: CHECKPOINT with .<scheme>.ptz)")
    args = ap.parse_args(argv)
    try:
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"cannot read {args.checkpoint} as a plain-tensor checkpoint ({type(e).__name__})") from None
    state, config = (ck["model"], ck["config"]) if "model" in ck else (ck, {})
    out = Path(args.out or Path(args.checkpoint).with_suffix(f".{args.scheme}.ptz"))
    st = write_artifact(out, state, config, args.scheme, args.compressor, config.get("control_tensor_name_patterns", ""))
    back, _, _ = read_artifact(out)
    mse = sum(float((back[k].float() - v.float()).square().sum()) for k, v in state.items()) / sum(v.numel() for v in state.values())
    code, detail = code_size(Path(__file__).resolve().parent)
    print(f"artifact:{out} bytes:{st['artifact_bytes']} payload:{st['payload_bytes']} weight_mse:{mse:.3e}")
    print(f"code_bytes:{code} ({detail}) total:{st['artifact_bytes'] + code}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
