"""Run by tests/test_phased_ttt.py under torchrun --nproc_per_node=2 (gloo): the legality check on phased_ttt, then with
the phase's gradient all-reduce removed, then one cold (no warm A) phased score; rank 0 writes them as JSON.
Usage: _phased_ranks.py DATA_PATH TOKENIZER_PATH OUT_JSON"""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import awake_model  # noqa: E402
from test_legality import TINY  # noqa: E402
from test_phased_ttt import PHASED  # noqa: E402

import train_gpt as tg  # noqa: E402  (on the path through _util)
import ttt_eval as te  # noqa: E402


def main(data_path: str, tokenizer_path: str, out: str) -> None:
    import sentencepiece as spm

    over = {**TINY, **PHASED, "data_path": data_path, "tokenizer_path": tokenizer_path}
    cfg, _ = tg.load_config(None, {k: str(v) for k, v in over.items()}, {})
    rt = tg.init_runtime(cfg)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    stream = tg.load_val_stream(tg.shard_files(data_path, "val"), 512)[:4000]
    tokens, tbytes = torch.from_numpy(stream.astype(np.int32)), torch.from_numpy(tg.val_target_bytes(cfg, sp, stream))
    model = awake_model(cfg)  # seeded: the same weights on both ranks
    model.cfg = cfg
    verdicts = {}
    for name in ("phased", "no_allreduce"):
        reduce = te.Adapter.reduce_grads
        if name == "no_allreduce":  # the mutation: each rank takes the phase's steps on its own half of the sequences
            te.Adapter.reduce_grads = lambda self, grads: None
        try:
            v = te.check_legality(cfg, model, tokens, tbytes, rt)
        finally:
            te.Adapter.reduce_grads = reduce
        verdicts[name] = {"ok": v.ok, "failed": [f.split(":")[0] for f in v.failed], "line": v.line}
    cold = dataclasses.replace(cfg, ttt_lora_warm_a=False, ttt_doc_batch=2)
    model.cfg = cold
    verdicts["cold_bpb"] = te.run_mode(cold, model, model, tokens, tbytes, rt).result()[1]
    if rt.is_main:
        Path(out).write_text(json.dumps(verdicts, indent=1))
    tg.dist.barrier()
    tg.dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
