"""Shared helpers for the tests: tiny run overrides, subprocess launch, log parsing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_RE = re.compile(r"^step:(\d+)/(\d+) train_loss:([-\d.naif]+) train_time:(\d+)ms step_avg:([\d.]+)ms")
VAL_RE = re.compile(r"^step:(\d+)/(\d+) val_loss:([\d.]+) val_bpb:([\d.]+)")


def tiny_args(sample: dict, **over) -> list[str]:
    """A few-second CPU run on the sample data: tiny model, step-count schedule, no cap."""
    base = dict(
        data_path=sample["data_path"], tokenizer_path=sample["tokenizer_path"], vocab_size=sample["vocab_size"],
        num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, train_seq_len=64, train_batch_tokens=1024,
        virtual_world_size=2, iterations=6, warmdown_iters=3, warmup_steps=1, val_loss_every=0, train_log_every=1,
        max_wallclock_seconds=0, val_batch_size=4096, autocast_dtype="fp32",
    )
    base.update(over)
    return [f"--{k}={v}" for k, v in base.items()]


def run_train(args: list[str], cwd: Path, nproc: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    # one thread per process: on 2 cores, tiny models spend more time syncing threads than computing
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for k in list(env):  # a developer's shell must not leak config into the test
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k.upper() in CONFIG_ENV:
            env.pop(k)
    Path(cwd).mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(launcher + [str(ROOT / "train_gpt.py")] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train_gpt.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(cwd: Path, run_id: str) -> str:
    return (cwd / "logs" / f"{run_id}.txt").read_text()


def train_losses(log: str) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for line in log.splitlines() if (m := STEP_RE.match(line))}


def _config_env() -> set[str]:
    sys.path.insert(0, str(ROOT))
    import train_gpt

    return {k.upper() for k in train_gpt.config_field_types()}


CONFIG_ENV = _config_env()


def awake_model(cfg, scale: float = 0.05):
    """GPT(cfg) built under seed 0 with every parameter nudged by N(0, scale^2): zero-initialised
    projections, gates and lambdas would otherwise hide whole paths from a test."""
    import torch

    sys.path.insert(0, str(ROOT))
    import train_gpt

    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def val_world(over: dict, data_path, tokenizer_path, n: int = 4000):
    """(config, the first n val tokens, their target bytes) of the sample data, for eval/legality tests."""
    import numpy as np
    import sentencepiece as spm
    import torch

    sys.path.insert(0, str(ROOT))
    import train_gpt as tg

    cfg, _ = tg.load_config(None, {k: str(v) for k, v in {**over, "data_path": data_path, "tokenizer_path": tokenizer_path}.items()}, {})
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    stream = tg.load_val_stream(tg.shard_files(str(data_path), "val"), cfg.vocab_size)[:n]
    return cfg, torch.from_numpy(stream.astype(np.int32)), torch.from_numpy(tg.val_target_bytes(cfg, sp, stream))


def verdict_of(cfg, model, tokens, tbytes, rt, no_allreduce: bool = False) -> dict:
    """The legality check's verdict as plain data; no_allreduce is the 2-rank mutation (each rank steps alone)."""
    import ttt_eval as te

    reduce = te.Adapter.reduce_grads
    if no_allreduce:
        te.Adapter.reduce_grads = lambda self, grads: None
    try:
        v = te.check_legality(cfg, model, tokens, tbytes, rt)
    finally:
        te.Adapter.reduce_grads = reduce
    return {"ok": v.ok, "failed": [f.split(":")[0] for f in v.failed], "line": v.line}


def write_verdicts(rt, out: str, verdicts: dict) -> None:
    """End of a torchrun test driver: rank 0 writes the results as JSON, then every rank leaves together."""
    import json

    import train_gpt as tg

    if rt.is_main:
        Path(out).write_text(json.dumps(verdicts, indent=1))
    tg.dist.barrier()
    tg.dist.destroy_process_group()
