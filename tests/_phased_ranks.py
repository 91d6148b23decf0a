"""Run by tests/test_phased_ttt.py under torchrun --nproc_per_node=2 (gloo): the legality check on phased_ttt, then with
the phase's gradient all-reduce removed, then one cold (no warm A) phased score; rank 0 writes them as JSON.
Usage: _phased_ranks.py DATA_PATH TOKENIZER_PATH OUT_JSON"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import awake_model, val_world, verdict_of, write_verdicts  # noqa: E402
from test_legality import TINY  # noqa: E402
from test_phased_ttt import PHASED  # noqa: E402

import train_gpt as tg  # noqa: E402  (on the path through _util)
import ttt_eval as te  # noqa: E402


def main(data_path: str, tokenizer_path: str, out: str) -> None:
    cfg, tokens, tbytes = val_world({**TINY, **PHASED}, data_path, tokenizer_path)
    rt = tg.init_runtime(cfg)
    model = awake_model(cfg)  # seeded: the same weights on both ranks
    model.cfg = cfg
    verdicts = {}
    for name in ("phased", "no_allreduce"):  # the mutation: each rank takes the phase's steps on its own half of the sequences
        verdicts[name] = verdict_of(cfg, model, tokens, tbytes, rt, no_allreduce=name == "no_allreduce")
    cold = dataclasses.replace(cfg, ttt_lora_warm_a=False, ttt_doc_batch=2)
    model.cfg = cold
    verdicts["cold_bpb"] = te.run_mode(cold, model, model, tokens, tbytes, rt).result()[1]
    write_verdicts(rt, out, verdicts)


if __name__ == "__main__":
    main(*sys.argv[1:])
