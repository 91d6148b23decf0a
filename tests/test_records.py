"""make_record.py: log parsing (ours and the official formats), significance, the builder, the validator,
the runner, and a 3-seed smoke record end to end (train -> artifact -> eval -> record -> validate)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from _util import CONFIG_ENV, ROOT

sys.path.insert(0, str(ROOT))
import make_record as mr  # noqa: E402

SEP = "=" * 100
SMI = ("+-----------------------------------------------------------------------------+\n"
       + "".join(f"|   {i}  NVIDIA H100 80GB HBM3          On  | 00000000:1{i}:00.0 Off |                    0 |\n" for i in range(8)))
CODE = {"train_gpt.py": "import os\nprint('train')\n", "quantize.py": "# q\nX = 1\n\n"}


def official_baseline(seed=1337, bpb="1.22436570", loss="2.07269931") -> str:
    """The NaiveBaseline log shape (spec 1.10): code dump, separator, versions, nvidia-smi, key:value lines."""
    return "\n".join([
        "import torch\nprint('official code dump, no source header')", SEP, "Running Python 3.11.10", "Running PyTorch 2.8.0+cu128", SMI, SEP,
        "model_params:17059912", "world_size:8 grad_accum_steps:1", f"seed:{seed}",
        "step:0/20000 val_loss:6.9370 val_bpb:4.0978 train_time:0ms step_avg:0.01ms",
        "step:1/20000 train_loss:6.9408 train_time:24ms step_avg:23.99ms",
        "step:13780/20000 val_loss:2.0606 val_bpb:1.2172 train_time:600038ms step_avg:43.54ms",
        "stopping_early: wallclock_cap train_time:600038ms step:13780/20000", "peak memory allocated: 10184 MiB reserved: 10200 MiB",
        "Serialized model: 67224983 bytes", "Code size: 47642 bytes", "Total submission size: 67272625 bytes",
        "Serialized model int8+zlib: 15815847 bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)",
        "Total submission size int8+zlib: 15863489 bytes",
        "final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1401ms",
        f"final_int8_zlib_roundtrip_exact val_loss:{loss} val_bpb:{bpb}", ""])


def official_record(seed, tail: list[str], sizes=("int6+zstd", 15889752, 89436)) -> str:
    """A record-era log (PR #473/#573/#1550 shapes): the eval lines given in `tail`."""
    tag, model, code = sizes
    return "\n".join(["code", SEP, "Running Python 3.11.10", "Running PyTorch 2.4.1+cu124", SMI, SEP, "world_size:8 grad_accum_steps:1",
                      f"seed:{seed}", "step:7273/9000 val_loss:1.9226 val_bpb:1.1389 train_time:600100ms step_avg:82.51ms",
                      "stopping_early: wallclock_cap train_time:600100ms step:7273/9000",
                      f"Serialized model {tag}: {model} bytes", f"Code size: {code} bytes", f"Total submission size {tag}: {model + code} bytes",
                      *tail, ""])


def ours(seed=42, ttt=4.4362, loss=6.0731, mode="legal_ttt", legality="legal", score=True, code=CODE, artifact=78632, extra=()) -> str:
    """A log as train_gpt.py + ttt_eval.py write it."""
    src = "".join(f"# ===== source: {n} =====\n{t}\n" for n, t in code.items())
    cfg = {"seed": seed, "run_id": f"smoke_seed{seed}", "quant_scheme": "mixed", "num_layers": 2, "data_path": "/d", "tie_embeddings": True}
    code_bytes = sum(len(t.encode()) for t in code.values())
    lines = [src + SEP, "Running Python 3.11.7 on Linux", "Running PyTorch 2.13.0+cpu cuda:None", SEP, f"config:{json.dumps(cfg, sort_keys=True)}",
             "config_sources:data_path=flag num_layers=env NUM_LAYERS quant_scheme=configs/smoke.toml tie_embeddings=flag",
             "dataset_fingerprint:val_sha256=d32f5cf0d3ee1a27 val_tokens:19780", "dataset_disjoint:val_docs_in_train=0/28 train_shards_checked:1",
             "model_params:90692", "world_size:1 grad_accum_steps:1 device:cpu compile:False autocast:fp32", f"seed:{seed}",
             "step:0/4 val_loss:6.2353 val_bpb:4.5548 train_time:0ms step_avg:0.01ms",
             "step:1/4 train_loss:6.2299 train_time:264ms step_avg:264.84ms tok_s:387 mfu:n/a",
             "step:4/4 train_loss:6.0436 train_time:1054ms step_avg:263.52ms tok_s:391 mfu:n/a",
             "step:4/4 val_loss:6.0790 val_bpb:4.4406 train_time:1060ms step_avg:265.00ms",
             "gptq_calibration:13 hessians source:train batches/rank:8 time:0.4s train_time:1.1s total:1.5s reserve:0.0s",
             "Serialized model: 368321 bytes", f"Code size: {code_bytes} bytes (raw " + " ".join(f"{n}:{len(t.encode())}" for n, t in code.items()) + ")",
             f"Total submission size: {368321 + code_bytes} bytes",
             f"Serialized model mixed+brotli: {artifact} bytes (payload:1 container:2 payload_ratio:3.05x) serialize_time:291ms compressor:brotli 1.2.1",
             f"Total submission size mixed+brotli: {artifact + code_bytes} bytes",
             "final_mixed_brotli_roundtrip val_loss:6.0791 val_bpb:4.4407 eval_time:2057ms",
             "final_mixed_brotli_roundtrip_exact val_loss:6.07910000 val_bpb:4.44069102",
             f"eval_start artifact:runs/smoke_seed{seed}/final_model.mixed.ptz bytes:{artifact} mode:{mode} legality:{legality}", *extra]
    if score:
        lines += ["final_sliding_window val_loss:6.0790 val_bpb:4.4405 eval_time:268ms", "final_sliding_window_exact val_loss:6.07900000 val_bpb:4.44057364"]
        lines += [f"{mode} val_loss:{loss:.4f} val_bpb:{ttt:.4f} eval_time:31782ms", f"{mode}_exact val_loss:{loss:.8f} val_bpb:{ttt:.8f}",
                  "eval_phases: load:0.0s warmup:0.0s sliding:0.3s scoring:8.6s training:21.8s", "eval_wallclock:32.1s budget:600s verdict:ok"]
    return "\n".join(lines) + "\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -----------------------------------------------------------------------------
# parsing


def test_parses_the_official_baseline_log(tmp_path):
    r = mr.parse_log(write(tmp_path / "train.log", official_baseline()))
    sc = r.score()
    assert (sc.name, sc.bpb, sc.loss, sc.eval_ms) == ("final_int8_zlib_roundtrip_exact", 1.2243657, 2.07269931, 1401.0)
    assert (r.seed, r.steps, r.train_s, r.step_avg_ms) == (1337, 13780, 600.038, 43.54)
    assert (r.artifact_bytes, r.info["code_bytes"], r.total_bytes) == (15815847, 47642, 15863489)
    assert r.hardware == "8xNVIDIA H100 80GB HBM3" and r.info["python"] == "3.11.10" and r.info["torch"] == "2.8.0+cu128"
    assert "stop_ms" in r.info and r.info["peak_mib"] == 10184 and r.sources == {}


@pytest.mark.parametrize("tail, label, bpb, note", [
    # PR #473: roundtrip, sliding, legal TTT, then the legacy label repeating the sliding value
    (["final_int6_roundtrip_exact val_loss:1.93 val_bpb:1.14592745", "final_int6_sliding_window_exact val_loss:1.89 val_bpb:1.12235095",
      "legal_ttt val_loss:1.8918 val_bpb:1.1204 eval_time:413300ms", "legal_ttt_exact val_loss:1.89181098 val_bpb:1.12043999",
      "final_int8_zlib_roundtrip_exact val_loss:1.89 val_bpb:1.12235095"], "legal_ttt_exact", 1.12043999, None),
    # PR #1550: the legacy label repeats the sliding score; the sliding label wins the preference
    (["final_int6_roundtrip_exact val_loss:2.80 val_bpb:1.06904293", "final_int6_sliding_window_exact val_loss:2.73 val_bpb:1.05855527",
      "final_int8_zlib_roundtrip_exact val_loss:2.73 val_bpb:1.05855527"], "final_int6_sliding_window_exact", 1.05855527, None),
    # PR #573: the TTT score lives only under final_int8_zlib_roundtrip_exact, after the real roundtrip line
    (["final_int6_roundtrip_exact val_loss:1.97 val_bpb:1.17112667", "final_int8_zlib_roundtrip_exact val_loss:1.77600088 val_bpb:1.05185315"],
     "final_int8_zlib_roundtrip_exact", 1.05185315, "roundtrip labels"),
    # a legacy label that only repeats another line's value (no better tier present)
    (["quantized_ttt_phased val_loss:2.3 val_bpb:1.0611 eval_time:455000ms", "quantized_ttt_phased_exact val_loss:2.32202732 val_bpb:1.06107587",
      "final_int6_roundtrip_exact val_loss:2.35 val_bpb:1.07"], "quantized_ttt_phased_exact", 1.06107587, None),
    (["final_int6_roundtrip_exact val_loss:2.35 val_bpb:1.07000000", "final_int8_zlib_roundtrip_exact val_loss:2.35 val_bpb:1.07000000"],
     "final_int8_zlib_roundtrip_exact", 1.07, "repeats the value of final_int6_roundtrip_exact"),
])
def test_score_preference_and_the_mislabelled_score(tmp_path, tail, label, bpb, note):
    r = mr.parse_log(write(tmp_path / "train_seed42.log", official_record(42, tail)))
    assert (r.score().name, r.score().bpb) == (label, bpb)
    notes = " ".join(r.score_notes())
    assert (note in notes) if note else notes == ""
    assert r.total_bytes == 15889752 + 89436 and r.artifact_bytes == 15889752


def test_parses_int6_lzma_and_four_decimal_fallback(tmp_path):
    r = mr.parse_log(write(tmp_path / "a.log", official_record(7, ["final_int6_sliding_window val_loss:1.8900 val_bpb:1.1224"], ("int6+lzma", 100, 10))))
    assert (r.total_bytes, r.score().name, r.score().decimals, r.score().exact) == (110, "final_int6_sliding_window", 4, False)


def test_parses_our_log_and_appended_eval(tmp_path):
    r = mr.parse_log(write(tmp_path / "smoke_seed42.txt", ours()))
    sc = r.score()
    assert (sc.name, sc.bpb, sc.loss, sc.section) == ("legal_ttt_exact", 4.4362, 6.0731, 0)
    assert r.sources == CODE  # byte-identical, trailing newlines included
    assert r.config["run_id"] == "smoke_seed42" and r.seed == 42 and r.hardware == "cpu"
    assert r.config_sources == {"data_path": "flag", "num_layers": "env NUM_LAYERS", "quant_scheme": "configs/smoke.toml", "tie_embeddings": "flag"}
    assert (r.info["calib_s"], r.info["serialize_ms"], r.info["compressor"], r.artifact_bytes) == (0.4, 291, "brotli 1.2.1", 78632)
    assert (r.train_s, r.eval_s, r.evals[0]["mode"], r.evals[0]["legality"], r.evals[0]["verdict"]) == (1.06, 32.1, "legal_ttt", "legal", "ok")
    assert r.find(r"^final_.*roundtrip").bpb == 4.44069102 and r.find(r"^final_.*roundtrip").section == -1
    assert r.find(r"sliding_window").section == 0 and r.pre_quant_bpb() == 4.4406
    assert mr.logged_code_sizes(r.info["code_detail"]) == {n: len(t) for n, t in CODE.items()}
    table = "\n".join(mr.budget_table(r))
    assert "margin 15," in table and "legal_ttt_exact val_bpb:4.4362" in table and "train + calibration 1.5 s" in table
    _, sets, cmds = mr.repro(r, sc)
    assert sets == ["data_path=/d", "num_layers=2", "tie_embeddings=true"]
    assert cmds[0].startswith("python train_gpt.py --config configs/smoke.toml --seed=42 --run_id=smoke_seed42 --data_path=/d")
    assert "ttt_eval.py --artifact runs/smoke_seed42/final_model.mixed.ptz" in cmds[1] and "--eval_mode=legal_ttt" in cmds[1]


def test_illegal_eval_mode_sets_the_compliance_flags(tmp_path):
    reason = "eval_legality:illegal-selection reason:keeps the minimum NLL (C2, C4) and trains on later tokens first (C1)"
    r = mr.parse_log(write(tmp_path / "x.txt", ours(mode="multipass_min", legality="illegal-selection", extra=[reason])))
    c = mr.compliance(r, r.score())
    assert r.score().name == "multipass_min_exact"
    assert (c["legality"], c["C1_causal"], c["C2_normalized"], c["C3_score_before_update"], c["C4_single_pass"]) == ("illegal-selection", False, False, None, False)
    legal = mr.parse_log(write(tmp_path / "y.txt", ours()))
    assert all(mr.compliance(legal, legal.score())[k] for k in ("C1_causal", "C2_normalized", "C3_score_before_update", "C4_single_pass"))


# -----------------------------------------------------------------------------
# statistics


def test_nats_bpb_conversion_by_hand():
    # baseline: val_loss 2.07269931 nats/token at 1.22436570 bpb -> 0.409449 tokens/byte (SP1024)
    tpb = mr.tokens_per_byte(2.07269931, 1.22436570)
    assert tpb == pytest.approx(1.22436570 * 0.6931471805599453 / 2.07269931, rel=1e-12) and tpb == pytest.approx(0.409449, abs=1e-6)
    assert mr.bpb_to_nats(1.22436570, tpb) == pytest.approx(2.07269931, rel=1e-12)
    assert mr.nats_to_bpb(0.005, tpb) == pytest.approx(0.00296, abs=1e-5)  # the spec's "0.005 nats ~ 0.00296 bpb"
    tpb8k = mr.tokens_per_byte(2.77174800, 1.07303003)  # SP8192 (PR #1812 seed 42 TTT line)
    assert mr.nats_to_bpb(0.005, tpb8k) == pytest.approx(0.00194, abs=1e-5)


def test_welch_against_hand_computation():
    # equal variances, n=3 each: t = (2-4)/sqrt(1/3+1/3) = -sqrt(6), Welch df = 4 exactly; the Student t CDF at
    # df=4 has a closed form: F(t) = 1/2 + 3/8 * x * (1 - x^2/12 ... ) with x = t/sqrt(1+t^2/4)
    w = mr.welch([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    t = -math.sqrt(6)
    u = 1 + t * t / 4
    p = 0.5 + 3 / 8 * (t / math.sqrt(u)) * (1 - t * t / (12 * u))
    assert (w["t"], w["df"], w["p_value"]) == (pytest.approx(t), pytest.approx(4.0), pytest.approx(p, rel=1e-9))
    assert p == pytest.approx(0.03524, abs=1e-5)  # a t-table: t=2.449 at 4 df lies between the 0.05 and 0.025 columns
    # unequal variances: se^2 = 1/3 + 4/3, t = -4/sqrt(5/3), df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    w = mr.welch([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    t, df = -4 / math.sqrt(5 / 3), 50 / 17

    def pdf(x):  # Student t density
        return math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x * x / df) ** (-(df + 1) / 2)

    n, lo = 200000, -400.0  # Simpson's rule from far in the tail up to t
    h = (t - lo) / n
    cdf = h / 3 * (pdf(lo) + pdf(t) + sum((4 if i % 2 else 2) * pdf(lo + i * h) for i in range(1, n)))
    assert (w["t"], w["df"]) == (pytest.approx(t), pytest.approx(df)) and w["p_value"] == pytest.approx(cdf, abs=2e-5)
    one = mr.welch([1.0, 2.0, 3.0], [4.0])  # a single reference value: one-sample t = (2-4)/(1/sqrt(3)), df 2
    assert one["t"] == pytest.approx(-2 * math.sqrt(3)) and one["df"] == 2
    assert one["p_value"] == pytest.approx(0.5 + one["t"] / (2 * math.sqrt(2 + one["t"] ** 2)))  # df=2 closed form
    assert mr.welch([1.0], [2.0, 3.0])["p_value"] is None and mr.welch([1.0, 1.0], [2.0, 2.0])["p_value"] is None


def test_significance_reports_both_criteria_separately():
    tpb = [0.4] * 3  # 0.005 nats = 0.005/ln2*0.4 = 0.002885 bpb
    ref = [1.1200, 1.1202, 1.1198]
    small = mr.significance([1.1190, 1.1191, 1.1189], tpb, ref, "test")  # 0.001 bpb better: significant, under the rule
    assert small["welch_bpb"]["passes"] and not small["readme_rule"]["passes"]
    assert small["delta_nats"] == pytest.approx(-0.001 * math.log(2) / 0.4) and small["readme_rule"]["threshold_bpb"] == pytest.approx(0.0028854, abs=1e-6)
    big = mr.significance([1.1150, 1.1151, 1.1149], tpb, ref, "test")  # 0.005 bpb = 0.0087 nats better
    assert big["welch_bpb"]["passes"] and big["readme_rule"]["passes"] and big["readme_rule"]["p_value"] < 0.01


def test_significance_edge_cases_are_not_significant_or_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--reference ','"):  # an empty list used to raise StatisticsError
        mr.reference_scores(",", None)
    logs = three_logs(tmp_path)
    for bad in (",", "", "nan,1.0"):
        assert mr.main(build_args(tmp_path, logs, [42, 314, 999], reference=bad)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --reference") and err.count("\n") == 1
    assert not (tmp_path / "records").exists()
    one = mr.welch([1.1, 1.1, 1.1], [1.2])  # zero-variance seeds vs one value: t = -inf, p = 0 before
    assert one["p_value"] is None and "zero variance" in one["why"]
    sig = mr.significance([1.1, 1.1, 1.1], [0.4] * 3, [1.2], "test")
    assert not sig["welch_bpb"]["passes"] and not sig["readme_rule"]["passes"] and sig["readme_rule"]["p_value"] is None
    assert "not computed (undefined" in mr._test_line(sig["welch_bpb"])


# -----------------------------------------------------------------------------
# builder


def build_args(tmp_path, logs, seeds, **kw):
    args = ["build", "--name", kw.pop("name", "Test Rec"), "--track", kw.pop("track", "track_non_record_16mb"), "--date", "2026-04-01",
            "--out", str(tmp_path / "records"), "--github-id", "me", "--logs", *map(str, logs), "--seeds", *map(str, seeds)]
    return args + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", *([v] if isinstance(v, str) else v))]


def three_logs(tmp_path, **kw):
    return [write(tmp_path / "logs" / f"smoke_seed{s}.txt", ours(seed=s, ttt=4.4362 + i * 1e-3, loss=(4.4362 + i * 1e-3) * 1.369, **kw)) for i, s in enumerate((42, 314, 999))]


def test_build_from_logs_and_refusals(tmp_path, capsys):
    logs = three_logs(tmp_path)
    assert mr.main(build_args(tmp_path, logs, [42, 314, 999], reference="4.46,4.47,4.45")) == 0
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(4.4372) and sub["seeds"] == [42, 314, 999] and sub["seed_results"]["314"]["val_bpb"] == 4.4372
    assert sub["bytes_total"] == max(mr.parse_log(p).total_bytes for p in logs) and sub["significance"]["welch_bpb"]["p_value"] < 0.05
    assert sub["compliance"]["C3_score_before_update"] is True and sub["versions"]["compressor"] == "brotli 1.2.1"
    assert {p.name for p in folder.iterdir()} >= {"README.md", "train_seed42.log", "train_seed999.log", "train_gpt.py", "quantize.py",
                                                  "config.json", "train_loss.png", "val_bpb.png"}
    assert (folder / "quantize.py").read_bytes() == CODE["quantize.py"].encode() and (folder / "train_seed42.log").read_bytes() == logs[0].read_bytes()
    assert (folder / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (folder / "README.md").read_text()
    assert "| **Mean** |" in readme and "Welch" in readme and "README rule" in readme and "differs from the current checkout" in readme
    assert mr.main(build_args(tmp_path, logs, [42, 314, 999], name="vs folder", reference_folder=str(folder))) == 0
    sig = json.loads((folder.parent / "2026-04-01_vs_folder" / "submission.json").read_text())["significance"]
    assert sorted(sig["reference"]) == [4.4362, 4.4372, 4.4382] and sig["delta_bpb"] == pytest.approx(0) and sig["welch_bpb"]["p_value"] == pytest.approx(0.5)
    capsys.readouterr()
    # never overwrite: the same name and date again is refused and the folder is untouched
    before = (folder / "README.md").read_bytes()
    assert mr.main(build_args(tmp_path, logs, [42, 314, 999])) == 2 and "already exists" in capsys.readouterr().err
    assert (folder / "README.md").read_bytes() == before and not list(folder.parent.glob(".*tmp*"))
    # a declared seed's log missing, incomplete, or from another seed
    gone = tmp_path / "logs" / "none.txt"
    assert mr.main(build_args(tmp_path, [logs[0], gone], [42, 314], name="b")) == 2 and "missing" in capsys.readouterr().err
    cut = write(tmp_path / "logs" / "cut.txt", ours(seed=314, score=False))  # the eval died
    assert mr.main(build_args(tmp_path, [logs[0], cut], [42, 314], name="c")) == 2 and "no score after its eval_start" in capsys.readouterr().err
    cut = write(tmp_path / "logs" / "cut2.txt", ours(seed=314).split("gptq_calibration")[0])  # training died
    assert mr.main(build_args(tmp_path, [logs[0], cut], [42, 314], name="c")) == 2
    assert "incomplete (no score line, no artifact size line, no 'Total submission size' line)" in capsys.readouterr().err
    assert mr.main(build_args(tmp_path, [logs[0], logs[1]], [42, 7], name="d")) == 2 and "ran seed 314, not the declared 7" in capsys.readouterr().err
    assert mr.main(build_args(tmp_path, logs[:2], [42], name="e")) == 2
    other = write(tmp_path / "logs" / "other.txt", ours(seed=314, code={"train_gpt.py": "changed\n"}))
    assert mr.main(build_args(tmp_path, [logs[0], other], [42, 314], name="f")) == 2 and "different code" in capsys.readouterr().err
    bad = write(tmp_path / "logs" / "bad.txt", ours(seed=5, mode="multipass_min", legality="illegal-selection"))
    assert mr.main(build_args(tmp_path, [bad], [5], name="g", track="track_10min_16mb")) == 2 and "not a record" in capsys.readouterr().err
    assert not (tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_b").exists()


def test_build_refuses_the_record_track_over_time(tmp_path, capsys):
    slow = write(tmp_path / "logs" / "slow.txt", ours(seed=5).replace("train_time:1060ms", "train_time:612000ms"))
    over = write(tmp_path / "logs" / "over.txt", ours(seed=6).replace("eval_wallclock:32.1s budget:600s verdict:ok",
                                                                      "eval_wallclock:612.5s budget:600s verdict:OVER"))
    for log, seed, why in ((slow, 5, "training took 612.4 s (train 612.0 + calibration 0.4), over the 600 s cap"),
                           (over, 6, "the eval took 612.5 s, over the 600 s cap")):
        assert mr.main(build_args(tmp_path, [log], [seed], track="track_10min_16mb")) == 2
        assert capsys.readouterr().err == f"error: seed {seed}: {why}: not a record, use track_non_record_16mb\n"
    assert not (tmp_path / "records").exists()
    assert mr.main(build_args(tmp_path, [slow, over], [5, 6])) == 0  # off the record track they are fine


def test_build_with_score_label_validates(tmp_path):
    assert mr.main(build_args(tmp_path, three_logs(tmp_path), [42, 314, 999], score_label="final_sliding_window")) == 0
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(4.44057364) and sub["seed_results"]["42"]["score_label"] == "final_sliding_window_exact"
    assert mr.validate(folder)[0] == []
    sub["seed_results"]["42"]["score_label"] = "no_such"
    (folder / "submission.json").write_text(json.dumps(sub))
    assert "train_seed42.log: no score line no_such (its seed_results score_label)" in mr.validate(folder)[0]


def test_build_names_every_artifact_per_seed(tmp_path):
    arts = [write(tmp_path / "runs" / str(s) / "model.ptz", c * 78632) for s, c in ((42, "a"), (314, "b"), (999, "c"))]
    assert mr.main(build_args(tmp_path, three_logs(tmp_path), [42, 314, 999], artifacts=list(map(str, arts)))) == 0
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    assert sorted(p.name for p in folder.glob("*.ptz")) == ["final_model_seed314.ptz", "final_model_seed42.ptz", "final_model_seed999.ptz"]
    assert [(folder / f"final_model_seed{s}.ptz").read_text()[0] for s in (42, 314, 999)] == ["a", "b", "c"]
    assert mr.validate(folder)[0] == []


# -----------------------------------------------------------------------------
# validator


def official_folder(tmp_path, n=3, **over):
    f = tmp_path / "rec"
    f.mkdir(parents=True)
    seeds, vals = [1337, 42, 2025][:n], ["1.12043999", "1.12164962", "1.12208505"][:n]
    for s, v in zip(seeds, vals):
        write(f / f"train_seed{s}.log", official_record(s, ["final_int6_sliding_window_exact val_loss:1.89 val_bpb:1.12235095",
                                                             f"legal_ttt_exact val_loss:1.89181098 val_bpb:{v}"]))
    write(f / "README.md", "# rec\n")
    write(f / "train_gpt.py", "x" * 89436)
    sub = {"author": "a", "github_id": "a", "name": "LegalTTT", "blurb": "b", "date": "2026-03-23", "val_loss": 1.89181098,
           "val_bpb": round(sum(map(float, vals)) / n, 8), "bytes_total": 15889752 + 89436, "bytes_code": 89436, "seeds": seeds}
    sub.update(over)
    write(f / "submission.json", json.dumps({k: v for k, v in sub.items() if v is not None}))
    return f


def test_validator_accepts_an_official_folder_and_says_what_it_could_not_check(tmp_path):
    problems, notes = mr.validate(official_folder(tmp_path))
    assert problems == [] and any("no artifact" in n for n in notes)
    # 8-key variant, one train.log, a 4-decimal val_bpb in submission.json
    f = tmp_path / "base"
    write(f / "train.log", official_baseline())
    write(f / "README.md", "x")
    write(f / "train_gpt.py", "x" * 47642)
    write(f / "submission.json", json.dumps({"author": "Baseline", "github_id": "openai", "name": "Naive Baseline", "blurb": "",
                                             "date": "2026-03-18T14:56:29Z", "val_bpb": 1.2244, "bytes_total": 15863489, "bytes_code": 47642}))
    problems, notes = mr.validate(f)
    assert problems == [] and any("no 'val_loss'" in n for n in notes)


@pytest.mark.parametrize("break_it, expect", [
    (lambda f: [p.unlink() for p in f.glob("*.log")], "no log file"),
    (lambda f: (f / "train_seed2025.log").unlink(), "declared seed 2025 has no log"),
    (lambda f: _edit(f, val_bpb=1.1215), "val_bpb 1.1215 does not match the mean"),
    (lambda f: _edit(f, bytes_total=16_000_001), "over the 16,000,000-byte cap"),
    (lambda f: _sparse(f / "final_model.int6.ptz", 15_920_000), "code + artifact = 16,009,436 bytes is over"),
    (lambda f: _edit(f, bytes_total=15_000_000), "understates"),
    (lambda f: (f / "submission.json").unlink(), "missing submission.json"),
    (lambda f: write(f / "train_seed42.log", official_record(42, ["nothing scored"])), "train_seed42.log: no score line"),
    (lambda f: write(f / "train_seed42.log", official_record(1, ["legal_ttt_exact val_loss:1 val_bpb:1.12164962"])), "declared seed 42 has no log"),
    (lambda f: _edit(f, seeds=[]), "none of the 3 log(s) is checked: submission.json declares no seeds"),
    (lambda f: _edit(f, seeds=["a", "b"]), "none of the 3 log(s) is checked"),
    (lambda f: _edit(f, seeds=["a", "b"]), "seeds entries 'a', 'b' are not integers"),
    (lambda f: _edit(f, seeds=[1337, 42, "2025"]), "seeds entries '2025' are not integers"),
    (lambda f: _edit(f, seeds=[1337, 1337, 1337]), "seeds lists seed 1337 3 times"),
])
def test_validator_catches_each_broken_folder(tmp_path, break_it, expect):
    f = official_folder(tmp_path)
    break_it(f)
    problems, _ = mr.validate(f)
    assert any(expect in p for p in problems), problems
    assert mr.main(["--validate", str(f)]) == 1


def _edit(f, **kw):
    sub = json.loads((f / "submission.json").read_text())
    sub.update(kw)
    (f / "submission.json").write_text(json.dumps({k: v for k, v in sub.items() if v is not None}))


def _sparse(path, size):
    with open(path, "wb") as fh:
        fh.truncate(size)


def test_validator_checks_our_folders_strictly_and_leaderboard(tmp_path, capsys):
    assert mr.main(build_args(tmp_path, three_logs(tmp_path), [42, 314, 999])) == 0
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    assert mr.validate(folder)[0] == []
    (folder / "quantize.py").write_text("edited\n")
    sub = json.loads((folder / "submission.json").read_text())
    del sub["seed_results"]
    (folder / "submission.json").write_text(json.dumps(sub))
    problems = " | ".join(mr.validate(folder)[0])
    assert "quantize.py is missing or differs" in problems and "missing field 'seed_results'" in problems and "bytes_code" in problems
    official_folder(tmp_path / "records" / "track_10min_16mb")  # plus an official one
    capsys.readouterr()
    assert mr.main(["--leaderboard", str(tmp_path / "records")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["#", "val_bpb", "track"] and "LegalTTT" in out[1] and out[3].startswith("not ranked")
    assert out[4].startswith(f"  {folder}: ") and "3 problem(s), first: submission.json: missing field 'seed_results'" in out[4]


def test_validator_enforces_the_record_track(tmp_path):
    reason = "eval_legality:illegal-selection reason:keeps the minimum NLL (C2, C4)"
    logs = three_logs(tmp_path, mode="multipass_min", legality="illegal-selection", extra=[reason])
    assert mr.main(build_args(tmp_path, logs, [42, 314, 999])) == 0  # a study: fine off the record track
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    sub = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_text(json.dumps({**sub, "track": "track_10min_16mb"}))  # relabelled
    assert mr.validate(folder)[0] == [f"train_seed{s}.log: eval legality is 'illegal-selection' (multipass_min_exact): not allowed on track_10min_16mb"
                                      for s in (314, 42, 999)]
    # an official folder under records/track_10min_16mb (the track from the path): stopped by the cap, 600.1 s, passes
    off = official_folder(tmp_path / "records" / "track_10min_16mb")
    problems, notes = mr.validate(off)
    assert problems == [] and "train_seed42.log: eval legality is 'unknown' (legal_ttt_exact): not logged" in notes
    log = off / "train_seed42.log"
    log.write_text(log.read_text().replace("train_time:600100ms", "train_time:612000ms"))
    assert mr.validate(off)[0] == ["train_seed42.log: training took 612.0 s (train 612.0 + calibration 0.0), over the 600 s cap: not allowed on track_10min_16mb"]


def test_validator_compares_every_logs_code(tmp_path):
    assert mr.main(build_args(tmp_path, three_logs(tmp_path), [42, 314, 999])) == 0
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-04-01_Test_Rec"
    assert mr.validate(folder)[0] == []
    edited = {**CODE, "quantize.py": CODE["quantize.py"].replace("1", "2")}  # same size: only the code check can see it
    write(folder / "train_seed999.log", ours(seed=999, ttt=4.4362 + 2e-3, loss=(4.4362 + 2e-3) * 1.369, code=edited))
    assert mr.validate(folder)[0] == ["quantize.py is missing or differs from the code in the source block of train_seed999.log"]


# -----------------------------------------------------------------------------
# runner and end to end


def clean_env():
    env = {k: v for k, v in os.environ.items() if k.upper() not in CONFIG_ENV and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 1 thread: far faster on a busy 2-core box


def make_record(args, cwd, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "make_record.py"), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout, check=False)


def test_runner_dry_run_refusals_and_stop_on_failure(tmp_path):
    cfg = str(ROOT / "configs" / "smoke.toml")
    p = make_record(["run", "--config", cfg, "--seeds", "1", "2", "--dry-run", "--set", "eval_stride=32", "quant_scheme=int8"], tmp_path)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and len(lines) == 6 and lines[0].startswith("torchrun --standalone --nproc_per_node=8 ")
    assert "--seed=1 --run_id=smoke_seed1 --eval_stride=32" in lines[0] and "--artifact runs/smoke_seed2/final_model.int8.ptz" in lines[4]
    assert lines[5] == lines[4] + " --check-legality"  # each seed's eval is followed by its self-check on the same flags
    p = make_record(["run", "--config", cfg, "--seeds", "1", "--nproc", "1", "--dry-run"], tmp_path)
    assert p.stdout.startswith(sys.executable) and "runs/smoke_seed1/final_model.mixed.ptz" in p.stdout and "--eval_mode=legal_ttt" in p.stdout
    write(tmp_path / "logs" / "smoke_seed2.txt", "old")
    p = make_record(["run", "--config", cfg, "--seeds", "1", "2", "--nproc", "1"], tmp_path)
    assert p.returncode == 2 and "logs/smoke_seed2.txt already exists" in p.stderr and not (tmp_path / "logs" / "smoke_seed1.txt").exists()
    assert make_record(["run", "--config", cfg, "--seeds", "1", "--set", "iterations"], tmp_path).returncode == 2
    p = make_record(["run", "--config", cfg, "--seeds", "3", "4", "--nproc", "1", "--set", "no_such_key=1"], tmp_path)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error: seed")]
    assert p.returncode == 2 and len(err) == 1 and "seed 3: training failed with exit code 2" in err[0]
    assert "--seed=3" in p.stdout and "--seed=4" not in p.stdout  # the runner echoes each command: seed 4 never started


@pytest.mark.skipif(not (ROOT / "ttt_eval.py").is_file(), reason="needs ttt_eval.py")
def test_three_seed_smoke_record_end_to_end(tmp_path, sample_data):
    tiny = {"iterations": 4, "num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1, "train_seq_len": 64, "train_batch_tokens": 1024,
            "virtual_world_size": 1, "max_wallclock_seconds": 0, "warmup_steps": 1, "val_loss_every": 2, "data_path": sample_data["data_path"],
            "tokenizer_path": sample_data["tokenizer_path"], "eval_seq_len": 64, "eval_stride": 64, "ttt_chunk_tokens": 8192, "ttt_epochs": 1}
    sets = [f"{k}={v}" for k, v in tiny.items()]
    seeds = ["42", "314", "999"]
    p = make_record(["run", "--config", str(ROOT / "configs" / "smoke.toml"), "--seeds", *seeds, "--nproc", "1", "--set", *sets], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("budget seed") == 3 and "margin" in p.stdout and "legal_ttt_exact val_bpb:" in p.stdout
    logs = [f"logs/smoke_seed{s}.txt" for s in seeds]
    arts = [f"runs/smoke_seed{s}/final_model.mixed.ptz" for s in seeds]
    p = make_record(["build", "--name", "Smoke", "--track", "track_non_record_16mb", "--logs", *logs, "--seeds", *seeds, "--github-id", "ci",
                     "--config", str(ROOT / "configs" / "smoke.toml"), "--reference", "4.6,4.61,4.59", "--artifacts", *arts, "--date", "2026-01-02"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    folder = tmp_path / "records" / "track_non_record_16mb" / "2026-01-02_Smoke"
    assert f"OK {folder.relative_to(tmp_path)}" in p.stdout
    sub = json.loads((folder / "submission.json").read_text())
    runs = [mr.parse_log(tmp_path / lg) for lg in logs]
    assert sub["val_bpb"] == pytest.approx(sum(r.score().bpb for r in runs) / 3, abs=1e-8)
    assert all(r.score().name == "legal_ttt_exact" and r.evals[0]["legality"] == "legal" for r in runs)
    assert all(any(e.get("check", "").startswith("pass key:") for e in r.evals) for r in runs), "run checks every seed"
    assert "no legality self-check" not in (folder / "README.md").read_text()
    for name, text in runs[0].sources.items():  # the code that ran, byte for byte, and its logged size
        assert (folder / name).read_bytes() == text.encode() and mr.logged_code_sizes(runs[0].info["code_detail"])[name] == len(text.encode())
    assert sub["bytes_total"] == sub["bytes_code"] + max((folder / f"final_model_seed{s}.mixed.ptz").stat().st_size for s in seeds)
    assert mr.validate(folder)[0] == []
    shutil.copy(folder / "train_seed42.log", folder / "x.log")  # a second log of seed 42: noted, train_seed42.log is used
    p = make_record(["validate", str(folder)], tmp_path)
    assert p.returncode == 0 and "note: 2 logs for seed 42 (train_seed42.log, x.log): train_seed42.log is used" in p.stdout


def test_code_files_agree_with_trainer():
    # make_record reads files only (no import of the trainer), so its list is a copy: keep them equal
    import train_gpt as tg
    assert mr.CODE_FILES == tg.CODE_FILES
    assert all((ROOT / f).is_file() for f in tg.CODE_FILES)


def test_phased_ttt_score_is_the_record_score(tmp_path):
    # a phased_ttt eval is score-first TTT: its exact line beats the sliding score it also prints
    r = mr.parse_log(write(tmp_path / "p.txt", ours(mode="phased_ttt", ttt=4.3000)))
    assert r.score().label == "phased_ttt" and r.score().bpb == pytest.approx(4.3)
    assert mr.compliance(r, r.score())["score_first_ttt"] is True and "phased_ttt" in mr.EVAL_MODES
