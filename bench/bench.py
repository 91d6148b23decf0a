"""Throughput benchmark: a config's model at its real shape, the real optimizer, synthetic tokens.

  python bench/bench.py --config configs/pr1812.toml --steps 20                     # CUDA: full size
  python bench/bench.py --config configs/smoke.toml --steps 5 --batch-tokens 2048    # CPU, seconds

Warmup steps compile every graph the run needs (looping off and on) and are reverted, as in
train_gpt.py; then N timed steps. Prints key:value lines: ms/step, tokens/s, model FLOPs per token,
MFU against the bf16 peak table, peak memory, compile seconds (the whole reverted warmup, where
every graph variant compiles), and eval tokens/s of the scoring forward. --out FILE.json keeps
them. Any --key=value (or --key value) is a config override; anything else is an error.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


class SyntheticLoader:
    """Uniform random tokens (fixed seed) with a BOS every 512 positions, already on the device."""

    def __init__(self, cfg, rt, seed: int = 0):
        self.cfg, self.rt = cfg, rt
        self.g = torch.Generator(device="cpu").manual_seed(seed)

    def next_batch(self, global_tokens: int, seq_len: int):
        local = global_tokens // (self.rt.world_size * self.rt.grad_accum)
        t = torch.randint(0, self.cfg.vocab_size, (local + 1,), generator=self.g)
        t[::512] = self.cfg.bos_id
        t = t.to(self.rt.device, non_blocking=True)
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


def sync(device):
    tg.sync(device)
    return time.perf_counter()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="reverted compile-priming steps per graph variant")
    ap.add_argument("--batch-tokens", type=int, default=0, help="global tokens per step (default: the config's)")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--looping", choices=("auto", "on", "off"), default="auto", help="time the looped schedule (auto: on when configured)")
    ap.add_argument("--eval-batches", type=int, default=3)
    ap.add_argument("--out", default=None)
    args, rest = ap.parse_known_args(argv)
    _, over = tg.parse_cli(rest, ())  # config overrides, --key=value or --key value; anything else is an error
    if args.batch_tokens:
        over["train_batch_tokens"] = str(args.batch_tokens)
    if args.seq_len:
        over["train_seq_len"] = str(args.seq_len)
    cfg, _ = tg.load_config(args.config, over)
    rt = tg.init_runtime(cfg)
    tg.seed_everything(cfg.seed)
    base = tg.GPT(cfg).to(rt.device)
    use_compile = cfg.compile and rt.device.type == "cuda"
    model = torch.compile(base, dynamic=False, fullgraph=True) if use_compile else base
    opt = tg.Optimizer(base, cfg, rt)
    if use_compile:
        opt.ns = torch.compile(tg.orthogonalize)
    log = (lambda msg="", console=True: print(msg, flush=True)) if rt.is_main else (lambda *a, **k: None)
    r = SimpleNamespace(cfg=cfg, rt=rt, log=log, base=base, model=model, opt=opt, loader=SyntheticLoader(cfg, rt))
    t0 = sync(rt.device)
    cfg.warmup_steps = max(args.warmup, 1)  # each graph variant's first step compiles; all of it is reverted
    tg.warmup(r, lambda: SyntheticLoader(cfg, rt))
    compile_s = sync(rt.device) - t0
    base.looping = cfg.num_loops > 0 and args.looping != "off" or args.looping == "on"
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = sync(rt.device)
        loss = tg.train_step(r, 1.0, cfg.muon_momentum)
        times.append(sync(rt.device) - t)
    ms = 1000 * statistics.median(times)
    tok_s = cfg.train_batch_tokens / (ms / 1000)
    fpt, peak = tg.flops_per_token(cfg, base, base.looping), tg.peak_flops(rt.device)
    x, y = r.loader.next_batch(cfg.val_batch_size if rt.device.type == "cuda" else cfg.train_batch_tokens, cfg.train_seq_len)
    base.eval()
    with torch.inference_mode(), tg.autocast(cfg, rt.device):
        model(x, y, reduction="none")
        t = sync(rt.device)
        for _ in range(args.eval_batches):
            model(x, y, reduction="none")
        eval_s = (sync(rt.device) - t) / max(args.eval_batches, 1)
    fused = tg.kernels.backend_line(cfg.fused_ce, cfg.fused_mlp, cfg.mlp_act, rt.device)
    res = {
        "config": args.config, "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "world_size": rt.world_size, "grad_accum": rt.grad_accum, "params": tg.count_params(base),
        "train_batch_tokens": cfg.train_batch_tokens, "train_seq_len": cfg.train_seq_len, "looping": base.looping,
        "attention_backend": tg.attention_backend(cfg, rt.device), "compile": use_compile, "compile_s": round(compile_s, 2),
        "fused_kernels": fused.partition(" WARNING")[0].removeprefix("fused_kernels: ") or "off",
        "ms_per_step": round(ms, 2), "ms_per_step_mean": round(1000 * statistics.mean(times), 2),
        "tok_s": round(tok_s), "tok_s_per_gpu": round(tok_s / rt.world_size), "flops_per_token": fpt,
        "mfu": round(fpt * tok_s / (peak * rt.world_size), 4) if peak else None,
        "peak_mem_mib": torch.cuda.max_memory_allocated(rt.device) // 2**20 if rt.device.type == "cuda" else None,
        "eval_tok_s": round(x.numel() / eval_s), "final_loss": round(loss.item(), 4), "steps": args.steps,
    }
    for k, v in res.items():
        log(f"{k}:{v}")
    if args.out and rt.is_main:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
