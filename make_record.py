"""make_record.py: reproduce seeds, build record folders from logs, test significance, validate.

  python make_record.py run --config configs/X.toml --seeds 42 314 999 [--nproc 8] [--set key=value ...]
                            [--eval-mode legal_ttt] [--tag T] [--dry-run]
  python make_record.py build --name NAME --track track_10min_16mb --logs logs/a.txt ... --seeds 42 314 999
                              [--github-id ID] [--reference 1.0810,1.0812 | --reference-folder DIR]
                              [--artifacts A.ptz ...] [--config X.toml] [--out records]
  python make_record.py validate FOLDER          (or --validate FOLDER)
  python make_record.py leaderboard records/     (or --leaderboard records/)

Everything here reads logs and files only: a record folder is derived from what the runs printed,
so every number in its README.md and submission.json can be re-checked against the shipped logs.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE_CAP = 16_000_000  # decimal bytes: code + artifact
TIME_CAP_S = 600.0  # training and evaluation, each on its own
# = train_gpt.CODE_FILES (read-only tool: no import)
CODE_FILES = ("train_gpt.py", "data_loader.py", "quantize.py", "ttt_eval.py", "pergroup.py", "kernels.py")
TRACKS = ("track_10min_16mb", "track_non_record_16mb")
EVAL_MODES = ("sliding", "legal_ttt", "phased_ttt", "multipass_min", "prequant_ttt")
LN2 = math.log(2.0)
SEP = "=" * 100
NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"

# -----------------------------------------------------------------------------
# Log parsing: our logs (train_gpt.py + the lines ttt_eval.py appends) and the official formats.

# Score preference, best first. Within a tier the LAST line wins: official scripts print their final
# score last, sometimes under a legacy label (final_int8_zlib_roundtrip_exact holding a sliding or TTT
# score: seed-results.md section 7 item 6), so the label is always reported with the value.
SCORE_TIERS = (r"legal_ttt|^phased_ttt$", r"^(multipass_min|prequant_ttt)$", r"^final_.*sliding_window", r"^quantized_ttt", r"^quantized_sliding_window",
               r"^final_.*ttt", r"^final_.*roundtrip")
# Official variants: 'final_sliding_window_eval_exact stride:64 val_loss:...' (settings before val_loss) and
# 'final_int8_zlib_roundtrip sliding val_loss:N sliding val_bpb:N' (a qualifier word: it joins the label).
SCORE_RE = re.compile(rf"^(?P<label>[A-Za-z][A-Za-z0-9_]*?)(?P<exact>_exact)?(?P<mid>(?: (?:\w+:{NUM}|[a-z]+))*) val_loss:(?P<loss>{NUM})"
                      rf" (?:[a-z]+ )?val_bpb:(?P<bpb>{NUM})(?P<rest>.*)$")
CODE_LINE_RE = re.compile(r"^(?:import \w|from [\w.]+ import |def \w|class \w)", re.MULTILINE)
SOURCE_RE = re.compile(r"^# ===== source: (\S+) =====\n", re.MULTILINE)
TRAIN_RE = re.compile(rf"^step:(\d+)/\d+ train_loss:({NUM}) train_time:({NUM})ms step_avg:({NUM})ms")
VAL_RE = re.compile(rf"^step:(\d+)/\d+ val_loss:({NUM}) val_bpb:({NUM})(?: train_time:({NUM})ms)?(?: step_avg:({NUM})ms)?")
GPU_RE = re.compile(r"^\|\s+\d+\s+((?:NVIDIA|Tesla)\S*(?: \S+)*?)\s{2,}\S+\s+\|")
# One-value lines: each named group lands in RunLog.info (numbers converted; the last line wins).
INFO_RES = [re.compile(p) for p in (
    r"^Running Python (?P<python>\S+)",
    r"^Running PyTorch (?P<torch>\S+)(?: cuda:(?P<cuda>\S+))?",
    r"^config_sources:(?P<config_sources>.*)$",
    r"^dataset_fingerprint:val_sha256=(?P<fingerprint>\w+) val_tokens:(?P<val_tokens>\d+)",
    r"^dataset_disjoint:val_docs_in_train=(?P<val_docs_in_train>\d+)/(?P<val_docs>\d+)",
    r"^model_params:(?P<params>\d+)",
    r"^world_size:(?P<world_size>\d+) grad_accum_steps:\d+(?: device:(?P<device>\S+))?",
    r"^\s*seed:\s*(?P<seed>\d+)\s*$",  # also '  seed: 42' in the PR-era 'Hyperparameters:' dump
    r"^stopping_early: wallclock_cap train_time:(?P<stop_ms>\d+)ms",
    rf"^gptq_calibration:.*? time:(?P<calib_s>{NUM})s",
    r"^Serialized model: (?P<raw_model_bytes>\d+) bytes",
    r"^Serialized model \S+: (?P<artifact_bytes>\d+) bytes(?:.*?serialize_time:(?P<serialize_ms>\d+)ms)?(?:.*?compressor:(?P<compressor>.+))?",
    r"^Code size: (?P<code_bytes>\d+) bytes(?: \((?P<code_detail>.*)\))?",
    r"^Total submission size: (?P<raw_total_bytes>\d+) bytes",
    r"^Total submission size \S+: (?P<total_bytes>\d+) bytes",
    r"^peak memory allocated: (?P<peak_mib>\d+) MiB",
)]
# Eval lines (ttt_eval.py): they describe the eval_start section they follow.
EVAL_RES = [re.compile(p) for p in (
    r"^eval_legality:(?P<reason>.*)$",
    r"^legality_check:(?P<check>.*)$",
    r"^eval_key:(?P<key>\w+)",
    r"^eval_phases: (?P<phases>.*)$",
    rf"^eval_wallclock:(?P<wall_s>{NUM})s budget:(?P<budget_s>{NUM})s verdict:(?P<verdict>\S+)",
)]
EVAL_START_RE = re.compile(r"^eval_start artifact:(?P<artifact>\S+) bytes:(?P<bytes>\d+) mode:(?P<mode>\S+) legality:(?P<legality>\S+)"
                           r"(?: block:(?P<block>\S+))?")
EVAL_END_RE = re.compile(r"^eval_end block:(?P<block>\S+) status:(?P<status>ok|failed)(?: error:(?P<error>.*))?")


def _num(v: str):
    return int(v) if re.fullmatch(r"[-+]?\d+", v) else float(v) if re.fullmatch(NUM, v) else v.strip()


def _field(k: str, v: str):
    """A logged value, typed; ids and hashes stay text (1 eval_key in ~140 is all digits with at most one 'e')."""
    return v.strip() if k in ("block", "key", "check", "fingerprint") else _num(v)


@dataclass
class Score:
    label: str  # without the _exact suffix
    loss: float
    bpb: float
    decimals: int  # of the printed bpb: sets the tolerance when a copy of it is checked
    exact: bool
    section: int  # -1: printed by training; i: inside the i-th eval_start section
    eval_ms: float | None = None

    @property
    def name(self) -> str:
        return self.label + ("_exact" if self.exact else "")


@dataclass
class RunLog:
    path: str
    sources: dict = field(default_factory=dict)  # code file -> text, from the source blocks
    info: dict = field(default_factory=dict)  # the INFO_RES values
    config: dict = field(default_factory=dict)
    gpus: list = field(default_factory=list)
    train: list = field(default_factory=list)  # (step, train_loss, train_time_ms)
    val: list = field(default_factory=list)  # (step, val_loss, val_bpb, train_time_ms)
    step_avg_ms: float | None = None  # from the last step line: the run's final average
    scores: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # one dict per eval_start section
    eval_notes: list = field(default_factory=list)  # eval blocks whose scores are not used, and why
    label: str | None = None  # a forced score label (build --score-label); None: the preference order

    seed = property(lambda self: self.config.get("seed", self.info.get("seed")))
    steps = property(lambda self: max((s[0] for s in self.train + self.val), default=None))
    artifact_bytes = property(lambda self: self.info.get("artifact_bytes", self.info.get("raw_model_bytes")))
    total_bytes = property(lambda self: self.info.get("total_bytes", self.info.get("raw_total_bytes")))
    train_s = property(lambda self: max([t[2] for t in self.train] + [v[3] or 0 for v in self.val] + [0]) / 1000)

    @property
    def config_sources(self) -> dict:
        return dict(re.findall(r"(\w+)=(env \w+|\S+)", self.info.get("config_sources", "")))

    @property
    def hardware(self) -> str:
        if self.gpus:
            names = sorted(set(self.gpus))
            return f"{len(self.gpus)}x{names[0]}" if len(names) == 1 else ", ".join(self.gpus)
        return "cpu" if self.info.get("device", "cpu") == "cpu" else str(self.info["device"])

    @property
    def eval_s(self) -> float | None:
        """The wallclock of the eval that printed the score, else that score line's own eval_time."""
        sc = self.score()
        if sc and sc.section >= 0 and "wall_s" in self.evals[sc.section]:
            return self.evals[sc.section]["wall_s"]
        return sc.eval_ms / 1000 if sc and sc.eval_ms is not None else None

    def find(self, pattern: str, last: bool = True) -> Score | None:
        hits = [s for s in self.scores if s.exact and re.search(pattern, s.label)]
        return (hits[-1] if last else hits[0]) if hits else None

    def score(self, label: str | None = None) -> Score | None:
        if label := label or self.label:  # the exact line; a 4-decimal one only where that label has no exact line
            hits = [s for s in self.scores if s.label == label.removesuffix("_exact") and (s.exact or not label.endswith("_exact"))]
            return ([s for s in hits if s.exact] or hits or [None])[-1]
        for exact in (True, False):  # a 4-decimal line only where a log has no exact line at all
            for pat in SCORE_TIERS:
                hits = [s for s in self.scores if s.exact == exact and re.search(pat, s.label)]
                if hits:
                    return hits[-1]
        return None

    def pre_quant_bpb(self) -> float | None:
        avg = [s.bpb for s in self.scores if s.label == "post_average"]
        return avg[-1] if avg else (self.val[-1][2] if self.val else None)

    def score_notes(self) -> list[str]:
        """Why a score may not be what its label says."""
        sc, notes = self.score(), list(self.eval_notes)
        if not sc:
            return notes
        same = [s.label for s in self.scores if s.exact and s.label != sc.label and abs(s.bpb - sc.bpb) < 1e-9]
        if same and "roundtrip" in sc.label:
            notes.append(f"{sc.name} repeats the value of {same[0]}_exact (a legacy label: it is that score)")
        rts = {s.label: s.bpb for s in self.scores if s.exact and "roundtrip" in s.label}
        if "roundtrip" in sc.label and len(set(rts.values())) > 1:
            notes.append(f"roundtrip labels {', '.join(rts)} differ: the last, {sc.name}, is used (official logs print "
                         "their sliding or TTT score under final_int8_zlib_roundtrip_exact; check the eval mode)")
        if len({s.bpb for s in self.scores if s.exact and s.label == sc.label}) > 1:
            notes.append(f"{sc.name} appears with different values: the last is used (choosing among repeated evals breaks C4)")
        return notes


def parse_log(path) -> RunLog:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    r = RunLog(path=str(path), sources=extract_sources(text))
    section = -1
    for line in text[log_start(text):].splitlines():
        line = line.rstrip("\r")
        if line.startswith("step:"):
            if t := TRAIN_RE.match(line):
                r.train.append((int(t[1]), float(t[2]), float(t[3])))
                r.step_avg_ms = float(t[4])
            elif v := VAL_RE.match(line):
                r.val.append((int(v[1]), float(v[2]), float(v[3]), float(v[4]) if v[4] else None))
                r.step_avg_ms = float(v[5]) if v[5] else r.step_avg_ms
        elif s := SCORE_RE.match(line):
            ms, label = re.search(rf"eval_time:({NUM})ms", s["rest"]), "_".join([s["label"], *re.findall(r" ([a-z]+)(?= |$)", s["mid"])])
            r.scores.append(Score(label, float(s["loss"]), float(s["bpb"]), len(s["bpb"].partition(".")[2]),
                                  bool(s["exact"]), section, float(ms[1]) if ms else None))
        elif line.startswith("config:{"):
            try:
                r.config = json.loads(line[len("config:"):])
            except json.JSONDecodeError:
                pass
        elif e := EVAL_START_RE.match(line):
            r.evals.append({k: _field(k, v) for k, v in e.groupdict().items() if v is not None} | {"reasons": []})
            section = len(r.evals) - 1
        elif (e := EVAL_END_RE.match(line)) and section >= 0 and r.evals[section].get("block") == e["block"]:
            r.evals[section].update({k: v.strip() for k, v in e.groupdict().items() if v is not None})
            section = -1  # what follows an ended block is no part of it
        elif g := GPU_RE.match(line):
            r.gpus.append(g[1].strip())
        elif section >= 0 and (e := next((m for rx in EVAL_RES if (m := rx.match(line))), None)):
            if "reason" in e.groupdict():
                r.evals[section]["reasons"].append(e["reason"].replace(" reason:", ": ", 1))
            else:
                r.evals[section].update({k: _field(k, v) for k, v in e.groupdict().items()})
        elif i := next((m for rx in INFO_RES if (m := rx.match(line))), None):
            r.info.update({k: _field(k, v) for k, v in i.groupdict().items() if v is not None})
    use_eval_blocks(r)
    for sc in r.scores:  # an exact line has no eval_time: take its short twin's
        if sc.exact and sc.eval_ms is None:
            twin = [t.eval_ms for t in r.scores if not t.exact and t.label == sc.label and t.section == sc.section and t.eval_ms]
            sc.eval_ms = twin[-1] if twin else None
    return r


def log_start(text: str) -> int:
    """The code a log prints first (our source blocks, or the official script, which may quote score or seed lines)
    is not log lines: it ends at the first separator line, followed by 'Running Python' or preceded by code."""
    m = re.search(rf"^{SEP}$", text, re.MULTILINE)
    return m.start() if m and (text.startswith("Running Python", m.end() + 1) or CODE_LINE_RE.search(text, 0, m.start())) else 0


def use_eval_blocks(r: RunLog) -> None:
    """Scores come from training and from the last complete eval block that printed any; a block is complete
    once its eval_end says ok (a log from before eval blocks: once it printed an exact score). The others
    become notes: a failed or killed eval, or an earlier one, never poisons or silently feeds a log."""
    for i, ev in enumerate(r.evals):
        ev["complete"] = ev.get("status") == "ok" if "block" in ev else any(s.exact and s.section == i for s in r.scores)
    scored = [i for i, ev in enumerate(r.evals) if ev["complete"] and any(s.section == i for s in r.scores)]
    for i, ev in enumerate(r.evals):
        if i not in scored[-1:] and (i in scored or not ev["complete"]):
            why = ("superseded by a later complete eval block" if ev["complete"] else f"failed ({ev.get('error', '?')})"
                   if ev.get("status") == "failed" else "incomplete (no eval_end: killed or still running)")
            r.eval_notes.append(f"eval block {ev.get('block', i + 1)} (mode:{ev['mode']}) {why}: its scores are not used")
    r.scores = [s for s in r.scores if s.section < 0 or s.section in scored[-1:]]


def extract_sources(text: str) -> dict[str, str]:
    """train_gpt.py logs each code file as '# ===== source: NAME =====\\n' + text + '\\n' and ends the last
    with the 100-'=' separator line: returns each text exactly as it was read (the first copy of a name)."""
    heads, out = list(SOURCE_RE.finditer(text)), {}
    for i, m in enumerate(heads):
        if i + 1 < len(heads):
            end = heads[i + 1].start()
        else:
            sep = text.find("\n" + SEP + "\n", m.end() - 1)
            end = sep + 1 if sep >= 0 else len(text)
        out.setdefault(m[1], text[m.end():end].removesuffix("\n"))
    return out


def logged_code_sizes(detail) -> dict[str, int]:
    """'raw train_gpt.py:79624 quantize.py:41307' -> {name: bytes}; {} for packed counts."""
    detail = str(detail or "")
    return {k: int(v) for k, v in re.findall(r"(\S+\.py):(\d+)", detail)} if detail.startswith("raw") else {}


# -----------------------------------------------------------------------------
# Statistics: Welch one-sided test in bpb, and the README rule (>= 0.005 nats at p < 0.01) in nats.


def tokens_per_byte(val_loss: float, val_bpb: float) -> float:
    """val_loss = NLL/tokens and val_bpb = NLL/(ln2 * bytes), so tokens/bytes = val_bpb * ln2 / val_loss."""
    return val_bpb * LN2 / val_loss


def bpb_to_nats(bpb: float, tpb: float) -> float:
    return bpb * LN2 / tpb


def nats_to_bpb(nats: float, tpb: float) -> float:
    return nats / LN2 * tpb


def welch(ours: list[float], ref: list[float], shift: float = 0.0) -> dict:
    """One-sided test that mean(ours) < mean(ref) - shift. A single reference value gets the one-sample
    test the 2026-03-18/19 records used. p_value is None (with why) where no test is defined."""
    from scipy import stats

    c = statistics.fmean(ref)  # t is translation-invariant; centring spares scipy's precision-loss warning
    ours, ref = [x - c for x in ours], [x - shift - c for x in ref]
    if len(ours) < 2:
        return {"t": None, "df": None, "p_value": None, "why": "needs >= 2 seeds of ours"}
    if len(ref) == 1:
        if statistics.variance(ours) == 0:  # t = +-inf (p = 0 or 1) or nan: no evidence either way
            return {"t": None, "df": None, "p_value": None, "why": "undefined: our seeds have zero variance and the reference is one value"}
        res, df, kind = stats.ttest_1samp(ours, ref[0], alternative="less"), len(ours) - 1, "one-sample t-test vs the reference"
    else:
        va, vb = statistics.variance(ours) / len(ours), statistics.variance(ref) / len(ref)
        if va + vb == 0:
            return {"t": None, "df": None, "p_value": None, "why": "undefined for these samples (zero variance)"}
        res, kind = stats.ttest_ind(ours, ref, equal_var=False, alternative="less"), "Welch one-sided (ours < reference)"
        df = (va + vb) ** 2 / (va ** 2 / (len(ours) - 1) + vb ** 2 / (len(ref) - 1))
    if not math.isfinite(float(res.pvalue)):
        return {"t": None, "df": None, "p_value": None, "why": "undefined for these samples (zero variance)"}
    return {"t": float(res.statistic), "df": float(df), "p_value": float(res.pvalue), "test": kind}


def significance(our_bpb: list[float], our_tpb: list[float], ref_bpb: list[float], source: str,
                 alpha: float = 0.01, threshold_nats: float = 0.005) -> dict:
    """Both criteria, reported separately. Nats are per token of OUR tokenizer: tokens/byte belongs to the
    val set and tokenizer, not to the model, so converting the reference with our ratio is exact on the
    same data, and across tokenizers the comparison goes through bpb."""
    tpb = statistics.fmean(our_tpb)
    ours_nats, ref_nats = [bpb_to_nats(b, t) for b, t in zip(our_bpb, our_tpb)], [bpb_to_nats(b, tpb) for b in ref_bpb]
    d_nats = statistics.fmean(ours_nats) - statistics.fmean(ref_nats)
    w, rule = welch(our_bpb, ref_bpb), welch(ours_nats, ref_nats, shift=threshold_nats)
    w["passes"] = w["p_value"] is not None and w["p_value"] < alpha
    rule.update(threshold_nats=threshold_nats, threshold_bpb=nats_to_bpb(threshold_nats, tpb),
                passes=-d_nats >= threshold_nats and rule["p_value"] is not None and rule["p_value"] < alpha)
    return {"reference": ref_bpb, "reference_source": source, "alpha": alpha, "tokens_per_byte": tpb,
            "delta_bpb": statistics.fmean(our_bpb) - statistics.fmean(ref_bpb), "delta_nats": d_nats,
            "welch_bpb": w, "readme_rule": rule}


# -----------------------------------------------------------------------------
# run: train -> artifact -> eval for each declared seed, then its time/size budget table.


def cmd_run(a) -> int:
    sets = []
    for s in a.set:
        k, eq, v = s.partition("=")
        if not eq or not k:
            return fail(f"--set {s!r}: expected key=value")
        sets.append((k.lstrip("-").replace("-", "_"), v))
    if any(k in ("seed", "run_id") for k, _ in sets):
        return fail("--set seed/run_id: the runner sets them from --seeds (run ids are <config stem>_seed<S>)")
    stem = Path(a.config).stem + (f"_{a.tag}" if a.tag else "")
    run_ids = {s: f"{stem}_seed{s}" for s in a.seeds}
    if not a.dry_run:
        if not Path(a.config).is_file():
            return fail(f"config {a.config} not found")
        if taken := [f"logs/{rid}.txt" for rid in run_ids.values() if (Path("logs") / f"{rid}.txt").exists()]:
            return fail(f"{taken[0]} already exists: logs are never overwritten (move it away or pass --tag)")
    flags, done = [f"--{k}={v}" for k, v in sets], []
    for seed, rid in run_ids.items():
        train = launcher(a.nproc, "train_gpt.py") + ["--config", a.config, f"--seed={seed}", f"--run_id={rid}"] + flags
        if a.dry_run:
            print(shlex.join(train))
            print(shlex.join(eval_command(a, f"runs/{rid}/final_model.{guess_scheme(a.config, sets)}.ptz", flags)))
            print(shlex.join(eval_command(a, f"runs/{rid}/final_model.{guess_scheme(a.config, sets)}.ptz", flags) + ["--check-legality"]))
            continue
        if rc := run_step(f"seed {seed}: training", train):
            return rc
        r = parse_log(Path("logs") / f"{rid}.txt")
        art = Path(r.config.get("out_dir") or Path("runs") / rid) / f"final_model.{r.config.get('quant_scheme', 'int8')}.ptz"
        if not art.is_file():
            return fail(f"seed {seed}: training finished but {art} does not exist")
        if rc := run_step(f"seed {seed}: eval", eval_command(a, str(art), flags)):
            return rc
        # the record's compliance column reads this check (same eval key); a FAIL is logged and build refuses it
        run_step(f"seed {seed}: legality self-check", eval_command(a, str(art), flags) + ["--check-legality"])
        r = parse_log(r.path)
        print("\n".join(budget_table(r)), flush=True)
        done.append(r)
    if done:
        print(f"\n{len(done)} seed(s) done. Build the record folder with:\n  python make_record.py build --name NAME --track "
              f"track_non_record_16mb --config {a.config} --seeds {' '.join(map(str, a.seeds))} --logs {' '.join(r.path for r in done)}")
    return 0


def launcher(nproc: int, script: str) -> list[str]:
    path = script if Path.cwd().resolve() == HERE else str(HERE / script)
    return [sys.executable, path] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}", path]


def eval_command(a, artifact: str, flags: list[str]) -> list[str]:
    return launcher(a.nproc, "ttt_eval.py") + ["--artifact", artifact, "--config", a.config, f"--eval_mode={a.eval_mode}"] + flags


def guess_scheme(config: str, sets: list) -> str:
    """For --dry-run only (a real run reads quant_scheme from its log): the last --set, else the TOML."""
    if hit := [v for k, v in sets if k == "quant_scheme"]:
        return hit[-1]
    m = re.search(r'^\s*quant_scheme\s*=\s*"(\w+)"', Path(config).read_text() if Path(config).is_file() else "", re.MULTILINE)
    return m[1] if m else "int8"


def run_step(what: str, cmd: list[str]) -> int:
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        rc = subprocess.run(cmd, check=False).returncode
    except OSError as e:
        return fail(f"{what} could not start ({e}): {shlex.join(cmd)}")
    return fail(f"{what} failed with exit code {rc}: {shlex.join(cmd)}", rc) if rc else 0


def fmt(x, spec: str = ",") -> str:
    return "-" if x is None else format(x, spec)


def budget_table(r: RunLog) -> list[str]:
    sc, calib, ev = r.score(), r.info.get("calib_s") or 0.0, {}
    if sc and sc.section >= 0:
        ev = r.evals[sc.section]
    ser, eval_s, total = r.info.get("serialize_ms"), r.eval_s, r.total_bytes
    return [f"budget seed {r.seed} ({r.path})",
            f"  train        {r.train_s:10.1f} s      steps {r.steps}" + (" (stopped by the wallclock cap)" if "stop_ms" in r.info else ""),
            f"  calibration  {calib:10.1f} s      inside the clock: train + calibration {r.train_s + calib:.1f} s, "
            f"margin {TIME_CAP_S - r.train_s - calib:.1f} s to {TIME_CAP_S:.0f} s",
            f"  serialize    {fmt(ser and ser / 1000, '10.1f'):>10} s",
            f"  eval         {fmt(eval_s, '10.1f'):>10} s      margin {fmt(None if eval_s is None else TIME_CAP_S - eval_s, '.1f')} s to {TIME_CAP_S:.0f} s"
            + (f" (verdict {ev['verdict']})" if "verdict" in ev else ""),
            f"  artifact     {fmt(r.artifact_bytes):>10} bytes",
            f"  code         {fmt(r.info.get('code_bytes')):>10} bytes",
            f"  total        {fmt(total):>10} bytes  margin {fmt(total and SIZE_CAP - total)} to {SIZE_CAP:,}",
            "  score        " + (f"{sc.name} val_bpb:{sc.bpb} val_loss:{sc.loss}" + (f" (mode {ev['mode']}, {ev['legality']})" if ev else "")
                                  if sc else "NO SCORE LINE")]


# -----------------------------------------------------------------------------
# build: a record folder from the logs only.


def cmd_build(a) -> int:
    if len(a.logs) != len(a.seeds) or len(set(a.seeds)) != len(a.seeds):
        return fail(f"{len(a.logs)} logs for {len(a.seeds)} declared seeds: give one log per distinct seed, in seed order")
    runs = []
    for seed, path in zip(a.seeds, a.logs):
        if not Path(path).is_file():
            return fail(f"seed {seed}: log {path} is missing")
        r = parse_log(path)
        r.label = a.score_label
        evals_done = any(s.section >= 0 for s in r.scores) or all(ev["complete"] or "check" in ev for ev in r.evals)  # else every eval died
        if missing := [w for w, ok in (("score line", r.score()), ("artifact size line", r.artifact_bytes),
                                       ("'Total submission size' line", r.total_bytes), ("score after its eval_start", evals_done)) if not ok]:
            return fail(f"seed {seed}: {path} is incomplete (no {', no '.join(missing)}): did the run and its eval finish?")
        if r.seed != seed:
            return fail(f"seed {seed}: {path} ran seed {r.seed}, not the declared {seed}")
        runs.append(r)
    code = runs[0].sources
    if "train_gpt.py" not in code:
        return fail(f"{runs[0].path} holds no '# ===== source: train_gpt.py =====' block: the code that ran cannot be shipped")
    for r in runs[1:]:
        if r.sources != code:
            names = sorted(n for n in set(code) | set(r.sources) if code.get(n) != r.sources.get(n))
            return fail(f"{r.path} ran different code than {runs[0].path} ({', '.join(names)}): a record is one code")
    scores = [r.score() for r in runs]
    comp = [compliance(r, sc) for r, sc in zip(runs, scores)]
    if a.track == "track_10min_16mb" and (bad := [(r, p) for r, sc in zip(runs, scores) for p in record_track_check(r, sc, strict=True)[0]]):
        return fail(f"seed {bad[0][0].seed}: {bad[0][1]}: not a record, use track_non_record_16mb")
    if over := [r for r in runs if r.total_bytes > SIZE_CAP]:
        return fail(f"seed {over[0].seed}: total {over[0].total_bytes:,} bytes is over the {SIZE_CAP:,}-byte cap")
    if a.artifacts and len(a.artifacts) != len(runs):
        return fail(f"{len(a.artifacts)} artifacts for {len(runs)} seeds: give one per seed, in seed order")
    for art, r in zip(a.artifacts or [], runs):
        if not Path(art).is_file() or Path(art).stat().st_size != r.artifact_bytes:
            return fail(f"seed {r.seed}: artifact {art} is missing or not the {r.artifact_bytes:,} bytes its log reports")
    sig = None
    if a.reference is not None or a.reference_folder:
        try:
            ref, source = reference_scores(a.reference, a.reference_folder)
        except ValueError as e:
            return fail(str(e))
        sig = significance([s.bpb for s in scores], [tokens_per_byte(s.loss, s.bpb) for s in scores], ref, source,
                           a.alpha, a.threshold_nats)
    date = a.date or datetime.date.today().isoformat()
    folder = Path(a.out) / a.track / f"{date}_{re.sub(r'[^A-Za-z0-9._-]+', '_', a.name).strip('_')}"
    if folder.exists():
        return fail(f"{folder} already exists: record folders are never overwritten")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))
    try:  # build in a sibling temp dir, then one rename: never a half-written record folder
        write_record(tmp, a, runs, scores, comp, sig, date)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        if folder.exists():
            raise FileExistsError(f"{folder} appeared while building")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {folder}")
    return report(folder)


def compliance(r: RunLog, sc: Score) -> dict:
    """Issue #1017 C1-C4 from the eval_start legality of the section that printed the score: a legal mode
    scores each token once, before any update on it, in one left-to-right pass (ttt_eval.py by
    construction); an illegal mode's logged reason names the conditions it breaks; else not logged."""
    ev = r.evals[sc.section] if sc.section >= 0 else None
    legality = ev["legality"] if ev else ("legal" if r.config and "roundtrip" in sc.label else "unknown")
    reasons = ev["reasons"] if ev else []
    conds = {f"C{i}_{what}": True if legality == "legal" else False if f"C{i}" in " ".join(reasons) else None
             for i, what in enumerate(("causal", "normalized", "score_before_update", "single_pass"), 1)}
    if len({s.bpb for s in r.scores if s.exact and s.label == sc.label}) > 1:
        conds["C4_single_pass"] = False  # one label, several values: a choice among evals
    leak = r.info.get("val_docs_in_train")
    checks = self_checks(r, ev)
    return {"legality": legality, "eval_mode": ev["mode"] if ev else sc.label, **conds,
            "self_check": None if not checks else all(c.startswith("pass") for c in checks), "self_check_lines": checks,
            "train_under_600s": r.train_s + (r.info.get("calib_s") or 0) <= TIME_CAP_S + train_grace_s(r),
            "eval_under_600s": None if r.eval_s is None else r.eval_s <= TIME_CAP_S,
            "artifact_under_16mb": None if r.total_bytes is None else r.total_bytes <= SIZE_CAP, "no_val_in_training": None if leak is None else leak == 0,
            "score_first_ttt": bool(ev and ev["mode"] in ("legal_ttt", "phased_ttt")), "reasons": reasons}


def self_checks(r: RunLog, ev: dict | None) -> list[str]:
    """The ttt_eval.py --check-legality verdicts in this log that cover the scored eval: the same eval_key
    (its eval/TTT config, artifact and ttt_eval.py code), whichever eval section of the log ran the check."""
    key = ev.get("key") if ev else None
    return [e["check"] for e in r.evals if key and re.search(rf"\bkey:{key}\b", e.get("check", ""))]


CHECK = {True: "pass", False: "**FAIL**", None: "**not run**"}


def train_grace_s(r: RunLog) -> float:
    """A run stopped by the wallclock cap ends just past it: the cap is checked after each step (spec 1.5; the
    NaiveBaseline stopped at 600.038 s), and train_gpt.py reads its stop vote one step late. Two average steps."""
    return 2 * (r.step_avg_ms or 0) / 1000 if "stop_ms" in r.info else 0.0


def record_track_check(r: RunLog, sc: Score, strict: bool) -> tuple[list[str], list[str]]:
    """-> (problems, notes) of one run against track_10min_16mb: a legal eval, training (+ GPTQ calibration) and
    eval each within 600 s. strict (ours): the legality must be logged 'legal'; else an unlogged one is a note."""
    c, P, N = compliance(r, sc), [], []
    if c["legality"] != "legal":
        (P if strict or c["legality"] != "unknown" else N).append(
            f"eval legality is '{c['legality']}' ({sc.name})" + (": not logged" if c["legality"] == "unknown" else ""))
    if c["self_check"] is False:
        bad = next(x for x in c["self_check_lines"] if not x.startswith("pass"))
        P.append(f"the legality self-check of this eval's config failed ({sc.name}): {bad[:300]}")
    elif c["self_check"] is None and strict:
        N.append(f"no passing legality self-check on this eval's config ({sc.name}): run ttt_eval.py --check-legality with its flags")
    calib = r.info.get("calib_s") or 0
    if c["train_under_600s"] is False:
        P.append(f"training took {r.train_s + calib:.1f} s (train {r.train_s:.1f} + calibration {calib:.1f}), over the {TIME_CAP_S:.0f} s cap")
    if c["eval_under_600s"] is False:
        P.append(f"the eval took {r.eval_s:.1f} s, over the {TIME_CAP_S:.0f} s cap")
    elif c["eval_under_600s"] is None:
        N.append("eval time not logged: not checked against the 600 s cap")
    return P, N


def reference_scores(values: str | None, folder: str | None) -> tuple[list[float], str]:
    if values is not None:
        try:
            ref = [float(x) for x in values.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--reference {values!r}: expected comma-separated bpb values") from None
        if not ref or not all(math.isfinite(x) for x in ref):
            raise ValueError(f"--reference {values!r}: expected one or more finite comma-separated bpb values")
        return ref, f"--reference {values}"
    f = Path(folder)
    if not f.is_dir():
        raise ValueError(f"--reference-folder {f} is not a folder")
    if runs := [rs[0] for rs in select_logs(f)[0].values() if rs[0].score()]:
        return [r.score().bpb for r in runs], f"{f} (score lines of {len(runs)} logs)"
    try:
        sub = json.loads((f / "submission.json").read_text())
        per = [float(v["val_bpb"]) for v in (sub.get("seed_results") or {}).values() if isinstance(v, dict) and "val_bpb" in v]
        ref, source = (per, f"{f}/submission.json seed_results") if per else ([float(sub["val_bpb"])], f"{f}/submission.json val_bpb")
        if all(math.isfinite(x) for x in ref):
            return ref, source
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise ValueError(f"--reference-folder {f}: no scored logs and no usable submission.json")


def write_record(d: Path, a, runs: list, scores: list, comp: list, sig: dict | None, date: str) -> None:
    for name, text in runs[0].sources.items():
        with open(d / name, "w", encoding="utf-8", newline="") as fh:  # newline="": byte-identical
            fh.write(text)
    for r in runs:
        shutil.copyfile(r.path, d / f"train_seed{r.seed}.log")
    for art, r in zip(a.artifacts or [], runs):
        shutil.copyfile(art, d / artifact_name(art, r.seed))
    if a.config:
        shutil.copyfile(a.config, d / Path(a.config).name)
    else:
        (d / "config.json").write_text(json.dumps(runs[0].config, indent=1, sort_keys=True) + "\n")
    if (HERE / "requirements.txt").is_file():
        shutil.copyfile(HERE / "requirements.txt", d / "requirements.txt")
    plots = write_plots(d, runs)
    sub = submission(a, runs, scores, comp, sig, date)
    (d / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    (d / "README.md").write_text(record_readme(a, runs, scores, comp, sig, sub, plots))


def artifact_name(art: str, seed: int) -> str:
    """final_model_seed<S> + the file's suffixes: one name per seed, whatever the runs called their artifacts."""
    return f"final_model_seed{seed}{''.join(Path(art).suffixes)}"


def _std(xs: list) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None  # sample std (ddof=1)


def submission(a, runs, scores, comp, sig, date) -> dict:
    bpb, loss, r0 = [s.bpb for s in scores], [s.loss for s in scores], runs[0]
    seed_results = {str(r.seed): {
        "val_bpb": s.bpb, "val_loss": s.loss, "score_label": s.name, "steps": r.steps, "step_avg_ms": r.step_avg_ms,
        "train_time_s": round(r.train_s, 3), "calibration_s": r.info.get("calib_s"), "eval_time_s": r.eval_s,
        "pre_quant_val_bpb": r.pre_quant_bpb(), "roundtrip_val_bpb": getattr(r.find(r"^final_.*roundtrip", last=False), "bpb", None),
        "sliding_val_bpb": getattr(r.find(r"^final_.*sliding_window"), "bpb", None), "artifact_bytes": r.artifact_bytes,
        "bytes_code": r.info.get("code_bytes"), "bytes_total": r.total_bytes, "eval_mode": c["eval_mode"],
        "legality": c["legality"], "log": f"train_seed{r.seed}.log"} for r, s, c in zip(runs, scores, comp)}
    flags = {k: (all(c[k] for c in comp) if all(c[k] is not None for c in comp) else None)
             for k in comp[0] if k not in ("legality", "eval_mode", "reasons", "self_check_lines")}
    return {"name": a.name, "github_id": a.github_id, "author": a.author or a.github_id, "track": a.track, "date": date,
            "blurb": a.blurb, "val_bpb": round(statistics.fmean(bpb), 8), "val_loss": round(statistics.fmean(loss), 8),
            "std": _std(bpb), "val_bpb_std": _std(bpb), "val_loss_std": _std(loss),
            "bytes_total": max(r.total_bytes for r in runs), "bytes_code": r0.info.get("code_bytes"),
            "artifact_bytes_max": max(r.artifact_bytes for r in runs), "seeds": [r.seed for r in runs],
            "seed_results": seed_results, "hardware": r0.hardware,
            "versions": {k: r0.info.get(k) for k in ("python", "torch", "cuda", "compressor")},
            "compliance": {"legality": sorted({c["legality"] for c in comp}), **flags, "three_seeds": len(runs) >= 3},
            "p_value": sig["welch_bpb"]["p_value"] if sig else None, "significance": sig,
            "dataset_fingerprint": r0.info.get("fingerprint"), "generator": "make_record.py"}


def write_plots(d: Path, runs: list) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: training boxes have no display
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    out, scores = [], [r.score() for r in runs]
    title = f"val_bpb {statistics.fmean(s.bpb for s in scores):.5f} ({', '.join(sorted({s.name for s in scores}))}, {len(runs)}-seed mean)"
    for fname, ylabel, col, rows in (("train_loss.png", "train loss", 1, "train"), ("val_bpb.png", "val bpb", 2, "val")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in runs:
            pts = getattr(r, rows)
            ax.plot([p[0] for p in pts], [p[col] for p in pts], marker="." if len(pts) < 30 else None, label=f"seed {r.seed}")
        if rows == "val":
            mark_final_scores(ax, runs)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5 ticks on short runs
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(d / fname)
        plt.close(fig)
        out.append(fname)
    return out


FINAL_MARKS = (("roundtrip", r"^final_.*roundtrip", False, "s"), ("sliding", r"^final_.*sliding_window", True, "^"),
               ("final", None, True, "*"))  # (legend, exact-line pattern (None: the score), last line of it?, marker)


def mark_final_scores(ax, runs: list) -> None:
    """The scores after training, at each run's last step: the val curve alone ends at the live model's value.
    A roundtrip or sliding line that is the final score itself is marked once, as final."""
    for kind, pattern, last, marker in FINAL_MARKS:
        hits = [(r.steps, s) for r in runs if (s := r.find(pattern, last) if pattern else r.score())
                and (not pattern or s is not r.score())]
        if hits:
            ax.scatter([x for x, _ in hits], [s.bpb for _, s in hits], marker=marker, zorder=3,
                       label=f"{kind} ({', '.join(sorted({s.name for _, s in hits}))})")


def repro(r: RunLog, sc: Score) -> tuple[str | None, list[str], list[str]]:
    """-> (TOML, key=value overrides, commands), rebuilt from config_sources: every key that a flag or an
    environment variable set becomes a --key=value flag, as make_record.py run passes them."""
    src = r.config_sources
    cfg = next((v for v in src.values() if v != "flag" and not v.startswith("env ")), None)
    sets = [f"{k}={json.dumps(r.config[k]) if isinstance(r.config[k], bool) else r.config[k]}" for k, v in sorted(src.items())
            if (v == "flag" or v.startswith("env ")) and k not in ("seed", "run_id") and k in r.config]
    n, conf, flags = r.info.get("world_size") or 1, (["--config", cfg] if cfg else []), [f"--{s}" for s in sets]
    pre = ["python"] if n == 1 else ["torchrun", "--standalone", f"--nproc_per_node={n}"]
    cmds = [shlex.join([*pre, "train_gpt.py", *conf, f"--seed={r.seed}", f"--run_id={r.config.get('run_id', '')}", *flags])]
    if sc.section >= 0:
        ev = r.evals[sc.section]
        cmds.append(shlex.join([*pre, "ttt_eval.py", "--artifact", ev["artifact"], *conf, f"--eval_mode={ev['mode']}", *flags]))
    return cfg, sets, cmds


README_COLS = (("Seed", "seed", None), ("Steps", "steps", ","), ("ms/step", "step_avg_ms", ".2f"), ("Train s", "train_time_s", ".1f"),
               ("Pre-quant bpb", "pre_quant_val_bpb", ".4f"), ("Roundtrip bpb", "roundtrip_val_bpb", ".8f"),
               ("Sliding bpb", "sliding_val_bpb", ".8f"), ("Final bpb", "val_bpb", ".8f"), ("Label", "score_label", None),
               ("val_loss", "val_loss", ".8f"), ("Artifact B", "artifact_bytes", ","), ("Code B", "bytes_code", ","),
               ("Total B", "bytes_total", ","), ("Eval s", "eval_time_s", ".1f"))


def _test_line(t: dict) -> str:
    return f"t = {t['t']:.3f}, df = {t['df']:.2f}, p = {t['p_value']:.3g}" if t["p_value"] is not None else f"not computed ({t['why']})"


def record_readme(a, runs, scores, comp, sig, sub, plots) -> str:
    r0, n, yn = runs[0], len(runs), {True: "yes", False: "**no**", None: "not logged"}
    L = [f"# {a.name}", "", f"**val_bpb = {sub['val_bpb']:.8f}** ({n}-seed mean" + (f", std {sub['std']:.5f}" if n > 1 else "")
         + f") | **{sub['bytes_total']:,} bytes** (max over seeds) | {sub['hardware']} | `{a.track}` | {sub['date']}", ""]
    L += [a.blurb, ""] if a.blurb else []
    L += [f"Built by `make_record.py` from the logs only. Score line: `{', '.join(sorted({s.name for s in scores}))}`"
          + (" (chosen with --score-label)." if a.score_label else " (preference: legal_ttt / phased_ttt > sliding window > quantized_ttt > roundtrip)."), ""]
    rows = [{"seed": int(k), **v} for k, v in sub["seed_results"].items()]
    L += ["| " + " | ".join(c[0] for c in README_COLS) + " |", "|" + "---|" * len(README_COLS)]
    L += ["| " + " | ".join(str(row[key]) if spec is None else fmt(row[key], spec) for _, key, spec in README_COLS) + " |" for row in rows]
    for what, f in (("Mean", statistics.fmean), ("Std", _std)):
        cells = [f"**{what}**"] + [fmt(f(col), {",": ",.0f", ".4f": ".5f"}.get(spec, spec)) if spec and None not in (col := [row[key] for row in rows]) else ""
                                   for _, key, spec in README_COLS[1:]]
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "Std is the sample standard deviation (ddof=1). Train s is the training clock (compile, warmup and validation "
          "excluded); Eval s is the eval's wallclock (`eval_wallclock`, else the score line's eval_time).", ""]
    if sig:
        w, rule = sig["welch_bpb"], sig["readme_rule"]
        L += ["## Significance", "", f"Reference: {', '.join(f'{x:.8g}' for x in sig['reference'])} ({sig['reference_source']}).", "",
              f"- Delta vs reference: **{sig['delta_bpb']:+.6f} bpb**, **{sig['delta_nats']:+.6f} nats** per token (nats = bpb x ln2 / "
              f"tokens-per-byte; tokens/byte = {sig['tokens_per_byte']:.6f}, from the logs' val_loss/val_bpb).",
              f"- {w.get('test', 'Welch')}, in bpb: {_test_line(w)} -> {'passes' if w['passes'] else 'does not pass'} at p < {sig['alpha']}.",
              f"- README rule, improvement >= {rule['threshold_nats']} nats ({rule['threshold_bpb']:.5f} bpb) at p < {sig['alpha']}: "
              f"{_test_line(rule)} -> **{'passes' if rule['passes'] else 'does not pass'}**.", ""]
    L += ["## Compliance", "", "| Seed | Eval mode | Legality | C1 causal | C2 normalized | C3 score before update | C4 single pass "
          "| Self-check |", "|---|---|---|---|---|---|---|---|"]
    L += [f"| {r.seed} | {c['eval_mode']} | {c['legality']} | " + " | ".join(yn[c[k]] for k in c if k[:2] in ("C1", "C2", "C3", "C4"))
          + f" | {CHECK[c['self_check']]} |" for r, c in zip(runs, comp)]
    L += ["", "C1-C4 are Issue #1017's conditions, read from each eval's `eval_start ... legality:` line. A legal mode scores "
          "every token exactly once, before the model is updated on it, in one left-to-right pass (by construction of ttt_eval.py)."]
    L += [f"- seed {r.seed}: {x}" for r, c in zip(runs, comp) for x in c["reasons"]]
    L += ["", "Self-check: `ttt_eval.py --check-legality` run on the same eval config, artifact and ttt_eval.py (its eval_key) "
          "perturbs the val prefix and taps the real eval path (README, Evaluation)."]
    for r, c in zip(runs, comp):  # a failed check outweighs any pass of the same key
        x = next((x for x in c["self_check_lines"] if not x.startswith("pass")), (c["self_check_lines"] or [None])[-1])
        L.append(f"- seed {r.seed}: " + (f"`{x}`" if x else "**no legality self-check was run on this eval's config**"))
    tmax, evs = max(r.train_s + (r.info.get("calib_s") or 0) for r in runs), [r.eval_s for r in runs if r.eval_s is not None]
    L += ["", "Margins (worst seed):", "", f"- Training + GPTQ calibration: {tmax:.1f} s of {TIME_CAP_S:.0f} s (margin {TIME_CAP_S - tmax:.1f} s)",
          "- Evaluation wallclock: " + (f"{max(evs):.1f} s of {TIME_CAP_S:.0f} s (margin {TIME_CAP_S - max(evs):.1f} s)" if evs else "not logged"),
          f"- Size: {sub['bytes_total']:,} bytes of {SIZE_CAP:,} (margin {SIZE_CAP - sub['bytes_total']:,} bytes)",
          "- Validation documents found in the checked train shards: " + ", ".join(
              f"{r.info['val_docs_in_train']}/{r.info['val_docs']}" if "val_docs" in r.info else "not logged" for r in runs)]
    if notes := [f"seed {r.seed}: {x}" for r in runs for x in r.score_notes()]:
        L += ["", "Score-line notes:", ""] + [f"- {x}" for x in notes]
    L += ["", "## Code", ""]
    sizes = logged_code_sizes(r0.info.get("code_detail"))
    for name, text in r0.sources.items():
        b, here = text.encode("utf-8"), HERE / name
        state = "not in the current checkout" if not here.is_file() else "matches the current checkout" if here.read_bytes() == b else "**differs from the current checkout**"
        L.append(f"- `{name}`: {len(b):,} bytes, extracted byte-identical from the logs' source block; {state}"
                 + ("" if sizes.get(name, len(b)) == len(b) else f"; **the log's Code size line counted {sizes[name]:,} bytes: the file changed during the run**"))
    cfg, sets, _ = repro(r0, scores[0])
    modes = sorted({c["eval_mode"] for c in comp})
    run = ["python", "make_record.py", "run", "--config", cfg or "CONFIG.toml", "--seeds", *map(str, sub["seeds"]), "--nproc", str(r0.info.get("world_size") or 1)]
    run += (["--eval-mode", modes[0]] if len(modes) == 1 and modes[0] in EVAL_MODES else []) + (["--set", *sets] if sets else [])
    L += [f"- Code bytes counted: {fmt(r0.info.get('code_bytes'))} ({r0.info.get('code_detail') or 'as logged'})", "",
          "## Reproduce", "", "From a checkout of this toolkit with the data prepared (`data/prepare.py`), all seeds in one go:", "",
          "```bash", shlex.join(run), "```", "", "The commands that ran, per seed (the eval appends to the training log):", "", "```bash"]
    L += [c for r, s in zip(runs, scores) for c in repro(r, s)[2]] + ["```", "", "## Files", "",
          "- `submission.json`: val_bpb and val_loss are means over seeds, bytes_total the max over seeds",
          "- " + ", ".join(f"`train_seed{r.seed}.log`" for r in runs) + " (eval lines included); " + ", ".join(f"`{x}`" for x in r0.sources)
          + f" (the code that ran); `{Path(a.config).name if a.config else 'config.json'}`, `requirements.txt`, " + ", ".join(f"`{p}`" for p in plots),
          f"- Versions: Python {r0.info.get('python')}, PyTorch {r0.info.get('torch')}, compressor {r0.info.get('compressor', 'not logged')}; "
          f"dataset fingerprint {r0.info.get('fingerprint', 'not logged')}", ""]
    return "\n".join(L)


# -----------------------------------------------------------------------------
# validate: any record folder, ours or the official repository's.

NUMBER, OPT_NUMBER, INT, TEXT = (int, float), (int, float, type(None)), (int,), (str,)
FIELDS = {  # name -> (accepted types, required of: every folder | ours (generator make_record.py) | none)
    "name": (TEXT, "all"), "github_id": (TEXT, "all"), "val_bpb": (NUMBER, "all"), "bytes_total": (INT, "all"),
    "date": (TEXT, "all"), "val_loss": (NUMBER, "ours"), "bytes_code": (INT, "ours"), "track": (TEXT, "ours"),
    "seeds": ((list, dict), "ours"), "seed_results": ((dict,), "ours"), "std": (OPT_NUMBER, "ours"), "hardware": (TEXT, "ours"),
    "versions": ((dict,), "ours"), "compliance": ((dict,), "ours"), "p_value": (OPT_NUMBER, "ours"),
    "significance": ((dict, type(None)), "ours"), "author": (TEXT, ""), "blurb": (TEXT, ""), "val_bpb_std": (OPT_NUMBER, ""),
}
ALIASES = {"val_bpb": ("mean_val_bpb", "mean_bpb"), "val_loss": ("mean_val_loss",), "name": ("run_name",), "bytes_code": ("code_bytes",)}
# Official submission.json sizes that, plus the code, must fit the cap where bytes_total is absent (a mean over the cap: some seed is).
ARTIFACT_KEYS = ("artifact_bytes_max", "artifact_bytes", "artifact_size_bytes", "artifact_bytes_mean", "bytes_model_int8_zlib",
                 "bytes_model_int6_zstd", "bytes_model_compressed")


def read_json(path: Path, problems: list) -> dict:
    if not path.is_file():
        return {}
    try:
        sub = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        return problems.append(f"{path.name} is not valid JSON ({e})") or {}
    return sub if isinstance(sub, dict) else problems.append(f"{path.name} is not a JSON object") or {}


def _is(v, types) -> bool:
    return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


def find_logs(folder: Path) -> list[Path]:
    """*.log, and *.txt named train*, seed* or *log*, in the folder; any .log/.txt in a logs* subfolder (official layouts)."""
    top = [p for p in folder.iterdir() if p.is_file() and (p.suffix == ".log" or p.suffix == ".txt" and (
           p.name.startswith(("train", "seed")) or "log" in p.name))]
    subs = [d for d in folder.iterdir() if d.is_dir() and d.name.startswith("logs")]
    return sorted(top + [p for d in subs for p in d.iterdir() if p.is_file() and p.suffix in (".log", ".txt")])


def seed_from_name(name: str) -> int | None:
    return int(m[1]) if (m := re.search(r"seed[_-]?(\d+)", name)) else None


def select_logs(folder: Path) -> tuple[dict, list[str], list[str]]:
    """-> ({seed: [RunLog, best first]}, notes, problems). The seed comes from the log (config or `seed:` line)
    before the file name: a file named for one seed that ran another contradicts the folder."""
    by_seed, notes, problems = {}, [], []
    for p in find_logs(folder):
        r, named = parse_log(p), seed_from_name(p.name)
        if r.seed is not None and named is not None and named != r.seed:
            problems.append(f"{p.name}: the file name says seed {named} but the log ran seed {r.seed}")
        by_seed.setdefault(r.seed if r.seed is not None else named if named is not None else p.name, []).append(r)
    for key, rs in by_seed.items():
        rs.sort(key=lambda r: Path(r.path).name not in (f"train_seed{key}.log", "train.log"))  # stable: else the first by name
        if len(rs) > 1:
            names = ", ".join(sorted(Path(r.path).name for r in rs))
            notes.append(f"{len(rs)} logs for seed {key} ({names}): {Path(rs[0].path).name} is used")
    return by_seed, notes, problems


def _tol(value: float, scores: list[Score]) -> float:
    """5e-6 against 8-decimal exact lines, 5e-5 against 4-decimal ones, never tighter than half a unit of
    the last decimal submission.json printed (at least 4 decimals are expected there)."""
    shown = len(repr(float(value)).partition(".")[2]) if "e" not in repr(float(value)) else 8
    return max(5e-6 if all(s.decimals >= 8 for s in scores) else 5e-5, 0.5 * 10.0 ** -max(shown, 4)) + 1e-12


def canonical(sub: dict, N: list) -> dict:
    """An official submission.json with a fact under another name (ALIASES): the canonical key takes it, with a note."""
    out = dict(sub)
    for key, names in ALIASES.items():
        if key not in sub and (alt := next((a for a in names if _is(sub.get(a), FIELDS[key][0])), None)):
            out[key] = sub[alt]
            N.append(f"submission.json: '{key}' is absent: {alt} is checked in its place")
    return out


def validate(folder) -> tuple[list[str], list[str]]:
    """-> (problems, notes): a problem breaks the folder; a note says what could not be checked. Our folders
    (generator make_record.py) must hold every field we write, in its type; in an official folder a missing or
    differently-shaped field is a note, and only a contradiction with its logs or the cap is a problem."""
    f, P, N = Path(folder), [], []
    if not f.is_dir():
        return [f"{f} is not a folder"], []
    P += [f"missing {n}" for n in ("README.md", "submission.json") if not (f / n).is_file()]
    P += [] if find_logs(f) else ["no log file (*.log, train*/seed*/*log*.txt, or in a logs/ folder)"]
    sub = read_json(f / "submission.json", P)
    ours = str(sub.get("generator", "")).startswith("make_record")  # ours: every field we write is required
    if not (f / "train_gpt.py").is_file():  # official folders may ship train_gpt_v5.py, train_mdlm.py, ...
        other = [] if ours else sorted(p.name for p in f.glob("*.py"))
        (N if other else P).append(f"no train_gpt.py: the code is {', '.join(other)}" if other else "missing train_gpt.py")
    sub, shape = (sub, P) if ours else (canonical(sub, N), N)
    for k, (types, need) in FIELDS.items() if (f / "submission.json").is_file() else ():
        if k not in sub and (need == "all" or need == "ours" and ours):
            shape.append(f"submission.json: missing field '{k}'" + ("" if ours else ": not checked"))
        elif k not in sub and k in ("val_loss", "bytes_code", "seeds"):
            N.append(f"submission.json has no '{k}': not checked")
        elif k in sub and not _is(sub[k], types):
            shape.append(f"submission.json: '{k}' is {type(sub[k]).__name__}, expected {' or '.join(t.__name__ for t in types)}"
                         + ("" if ours else ": not checked"))
    results = per_seed(sub)
    seeds, found = declared_seeds(sub, results, P, N), find_logs(f)
    groups, notes, bad = select_logs(f)
    logs = {k: rs[0] for k, rs in groups.items() if seeds is None or k in seeds}
    N += notes
    P += bad + [f"declared seed {s} has no log" for s in seeds or [] if s not in logs]
    if found and not logs:
        P.append(f"none of the {len(found)} log(s) is checked: " + ("submission.json declares no seeds" if not seeds else
                 f"none ran a declared seed ({', '.join(map(str, seeds))})"))
    elif extra := [Path(r.path).name for k, rs in groups.items() if k not in logs for r in rs]:
        N.append(f"log(s) of undeclared seeds not checked: {', '.join(extra)}")
    for key, res in results.items():  # the score line build chose (--score-label), else the preference order
        if key in logs and isinstance(res.get("score_label"), str):
            logs[key].label = res["score_label"]
    for r in logs.values():
        if not r.score():
            P.append(f"{Path(r.path).name}: no score line " + (f"{r.label} (its seed_results score_label)" if r.label else
                     "(legal_ttt_exact, phased_ttt_exact, final_*sliding_window*_exact, quantized_ttt*_exact or final_*_roundtrip_exact)"))
        N += [f"{Path(r.path).name}: {x}" for x in r.score_notes()]
    logs = check_claims(sub, groups, logs, ours, seeds is None, P, N)
    track = sub["track"] if isinstance(sub.get("track"), str) else next((t for t in reversed(f.resolve().parts) if t.startswith("track_")), "")
    if track.removeprefix("track_") == "10min_16mb":
        for r in logs.values():
            if sc := r.score():
                tp, tn = record_track_check(r, sc, strict=ours)
                P += [f"{Path(r.path).name}: {x}: not allowed on track_10min_16mb" for x in tp]
                N += [f"{Path(r.path).name}: {x}" for x in tn]
    for key, res in results.items():  # ours: the line build chose; official: any score line of that log
        r = logs.get(key)
        if r and r.score() and _is(res.get("val_bpb"), NUMBER) and not any(
                abs(res["val_bpb"] - s.bpb) <= _tol(res["val_bpb"], [s]) for s in ([r.score()] if ours else r.scores)):
            P.append(f"seed_results[{key}].val_bpb {res['val_bpb']} != its log's {r.score().name} {r.score().bpb}")
    check_sizes(f, sub, logs, results, ours, P, N)
    differs = {}  # every log's code against the shipped files
    for r in logs.values():
        for name, text in r.sources.items():
            if not (f / name).is_file() or (f / name).read_bytes() != text.encode("utf-8"):
                differs.setdefault(name, []).append(Path(r.path).name)
    P += [f"{name} is missing or differs from the code in the source block of {', '.join(who)}" for name, who in differs.items()]
    if logs and not any(r.sources for r in logs.values()):
        N.append("the logs hold no '# ===== source:' blocks: the shipped code was not compared with the code that ran")
    elif bare := [Path(r.path).name for r in logs.values() if not r.sources and any(x.sources for x in logs.values())]:
        N.append(f"{', '.join(bare)} hold(s) no '# ===== source:' blocks: its code was not compared")
    return P, N


def claim_candidates(groups: dict, logs: dict, single: bool) -> list[tuple[dict, str | None]]:
    """(logs, label) whose mean a claimed score may be, the preferred first: one log per seed (each choice where a
    seed has several logs, up to 64 choices), with each score label they all print; without declared seeds also one log alone."""
    sets = [dict(zip(logs, c)) for c in itertools.islice(itertools.product(*(groups[k] for k in logs)), 64)]
    sets += [{k: r} for k, r in logs.items()] if single and len(logs) > 1 else []
    return [(s, label) for s in sets for label in [None, *sorted(set.intersection(*({x.label for x in r.scores} for r in s.values())))]]


def check_claims(sub: dict, groups: dict, logs: dict, ours: bool, single: bool, P: list, N: list) -> dict:
    """val_bpb and val_loss against the mean of the logs' score lines: ours, the lines build chose; an official folder,
    any claim_candidates one (a note where it is not the preferred). -> the logs, labelled as the val_bpb claim reads them."""
    cands = [(logs, None)] if ours or not logs else claim_candidates(groups, logs, single)
    for fld, attr in (("val_bpb", "bpb"), ("val_loss", "loss")):
        if not _is(v := sub.get(fld), NUMBER):
            continue
        means = [(i, s, label, sc) for i, (s, label) in enumerate(cands) if all(sc := [r.score(label) for r in s.values()]) and sc]
        hit = next((m for m in means if abs(v - statistics.fmean(getattr(x, attr) for x in m[3])) <= _tol(v, m[3])), None)
        if hit is None and means and means[0][0] == 0:
            sc, tol = means[0][3], _tol(v, means[0][3])
            mean, what = statistics.fmean(getattr(x, attr) for x in sc), ", ".join(sorted({x.name for x in sc}))
            P.append(f"submission.json {fld} {v} does not match the mean of the logs' score lines, {mean:.8f} ({what} over "
                     f"{len(sc)} log(s), tolerance {tol:.1g})" + _other_label(logs, attr, v, tol))
        elif hit and hit[0]:
            _, s, label, sc = hit
            names, what = ", ".join(sorted(Path(r.path).name for r in s.values())), ", ".join(sorted({x.name for x in sc}))
            N.append(f"{fld} {v} is " + (f"the score of {names} ({what})" if single and len(s) < len(logs) else
                                         f"the mean of {what} over {names}") + ", not of the preferred score lines: checked as that")
            if fld == "val_bpb":
                logs = {k: r for k, r in s.items()}
                for r in logs.values():
                    r.label = label or r.label
    return logs


def per_seed(sub: dict) -> dict[int, dict]:
    """{seed: its results} from seed_results, and from seeds given as a dict ({seed: {...}} or {seed: bpb})."""
    out = {}
    for src in (sub.get("seeds"), sub.get("seed_results")):
        for k, v in src.items() if isinstance(src, dict) else ():
            if m := re.fullmatch(r"(?:seed[_-]?)?(\d+)", str(k)):
                out.setdefault(int(m[1]), {}).update(v if isinstance(v, dict) else {"val_bpb": v} if _is(v, NUMBER) else {})
    return out


def declared_seeds(sub: dict, results: dict, P: list, N: list) -> list[int] | None:
    """submission.json's seeds (a list of ints), else the seeds its per-seed results name, else its one `seed`;
    None: nothing declared (all logs)."""
    if isinstance(sub.get("seeds"), list):
        if bad := [s for s in sub["seeds"] if not _is(s, INT)]:
            P.append(f"submission.json: seeds entries {', '.join(map(repr, bad))} are not integers")
        seeds = [int(s) for s in sub["seeds"] if _is(s, INT) or str(s).isdigit()]
        P += [f"submission.json: seeds lists seed {s} {seeds.count(s)} times" for s in sorted(set(seeds)) if seeds.count(s) > 1]
        return seeds
    if results:
        return list(results)
    if any(isinstance(sub.get(k), dict) and sub[k] for k in ("seeds", "seed_results")):
        N.append("seed_results keys are not seeds: every log is checked")
    return [sub["seed"]] if _is(sub.get("seed"), INT) else None


def _other_label(logs: dict, attr: str, value: float, tol: float) -> str:
    common = set.intersection(*({s.label for s in r.scores if s.exact} for r in logs.values()))
    for label in sorted(common):
        if abs(statistics.fmean(getattr(r.score(label), attr) for r in logs.values()) - value) <= tol:
            return f"; it matches the mean of {label}_exact instead"
    return ""


def check_sizes(f: Path, sub: dict, logs: dict, results: dict, ours: bool, P: list, N: list) -> None:
    total = sub["bytes_total"] if _is(sub.get("bytes_total"), INT) else None
    if total is not None and total > SIZE_CAP:
        P.append(f"bytes_total {total:,} is over the {SIZE_CAP:,}-byte cap")
    logged = {k: r.total_bytes for k, r in logs.items() if r.total_bytes is not None}
    if total is not None and logged and total < max(logged.values()):
        P.append(f"bytes_total {total:,} understates the logs' largest total, {max(logged.values()):,} (seed {max(logged, key=logged.get)})")
    P += [f"{Path(r.path).name}: its total {t:,} bytes is over the {SIZE_CAP:,}-byte cap" for r in logs.values()
          if (t := r.info.get("total_bytes")) is not None and t > SIZE_CAP]
    code = sum((f / n).stat().st_size for n in CODE_FILES if (f / n).is_file())
    raw = ours and all(str(r.info.get("code_detail", "")).startswith("raw") for r in logs.values())
    if _is(sub.get("bytes_code"), INT) and sub["bytes_code"] != code:  # packed or wrapper counts differ from the files by design
        (P if raw else N).append(f"bytes_code {sub['bytes_code']:,} != the shipped code files' {code:,} bytes" + ("" if raw else " (a packed count?)"))
        code = code if raw else sub["bytes_code"]  # what the submission counted is what code + artifact must add up to
    sized = [(f"seed_results[{k}]: {key}", res[key], key != "bytes_total") for k, res in results.items()
             for key in ("bytes_total", "artifact_bytes") if _is(res.get(key), INT)]  # official folders without bytes_total
    for what, b, plus_code in sized + [(key, sub[key], True) for key in ARTIFACT_KEYS if _is(sub.get(key), INT)]:
        if b + code * plus_code > SIZE_CAP:
            P.append(f"{what} {b:,}" + (f" + code {code:,} = {b + code:,}" if plus_code else "")
                     + f" bytes is over the {SIZE_CAP:,}-byte cap")
    if not (arts := sorted(f.glob("*.ptz"))):
        N.append("no artifact (*.ptz) in the folder: bytes_total not checked against code + artifact")
        return
    totals = {}
    for p in arts:
        seed = seed_from_name(p.name) if seed_from_name(p.name) is not None else next(iter(logs)) if len(logs) == 1 else p.name
        t = totals[seed] = code + p.stat().st_size
        if t > SIZE_CAP:
            P.append(f"{p.name}: code + artifact = {t:,} bytes is over the {SIZE_CAP:,}-byte cap")
        res = results.get(seed, {})
        if _is(res.get("bytes_total"), INT) and res["bytes_total"] != t:
            P.append(f"seed_results[{seed}].bytes_total {res['bytes_total']:,} != code {code:,} + {p.name} {p.stat().st_size:,}")
    if total is not None and (total < max(totals.values()) or set(totals) >= set(logs) and total != max(totals.values())):
        P.append(f"bytes_total {total:,} != code {code:,} + largest artifact = {max(totals.values()):,}")


def report(folder) -> int:
    problems, notes = validate(folder)
    print("\n".join([f"note: {n}" for n in notes] + [f"FAIL: {p}" for p in problems]
                    + [f"{'INVALID' if problems else 'OK'} {folder}" + (f": {len(problems)} problem(s)" if problems else "")]))
    return 1 if problems else 0


# -----------------------------------------------------------------------------
# leaderboard and CLI


def cmd_leaderboard(a) -> int:
    """Valid folders ranked by val_bpb; the others listed apart with why: a claim is ranked only if its logs bear it out."""
    rows, unranked = [], []
    for p in sorted(Path(a.root).rglob("submission.json")):
        problems, _ = validate(p.parent)
        sub = canonical(read_json(p, problems), [])
        if problems or not _is(sub.get("val_bpb"), NUMBER):
            unranked.append(f"  {p.parent}: " + (f"{len(problems)} problem(s), first: {problems[0]}" if problems else "no numeric val_bpb"))
            continue
        rows.append((float(sub["val_bpb"]), str(sub.get("track") or next((t for t in p.parts if t.startswith("track_")), "-")),
                     str(sub.get("name", p.parent.name)), ",".join(map(str, sub.get("seeds") or [])) or "-",
                     fmt(sub["bytes_total"]) if _is(sub.get("bytes_total"), INT) else "-", str(sub.get("date", "-"))[:10], str(p.parent)))
    if not rows and not unranked:
        return fail(f"no submission.json under {a.root}")
    table = [("#", "val_bpb", "track", "name", "seeds", "bytes_total", "date", "folder")]
    table += [(str(i), f"{r[0]:.5f}", *r[1:]) for i, r in enumerate(sorted(rows), 1)]
    w = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    print("\n".join("  ".join(c.ljust(w[j]) for j, c in enumerate(row)).rstrip() for row in table))
    if unranked:
        print("\nnot ranked (python make_record.py validate FOLDER says why in full):\n" + "\n".join(unranked))
    return 0


def fail(msg: str, rc: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return rc


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("--validate", "--leaderboard"):
        argv = [argv[0][2:], *argv[1:]]
    p = argparse.ArgumentParser(prog="make_record.py", description="Seeds -> logs -> record folders; validation; leaderboard.")
    sp = p.add_subparsers(dest="cmd", required=True)
    r = sp.add_parser("run", help="train + eval each declared seed, then print its budget table")
    r.add_argument("--config", required=True)
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--nproc", type=int, default=8, help="processes per run (1: plain python, no torchrun)")
    r.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for train and eval")
    r.add_argument("--eval-mode", default="legal_ttt", choices=EVAL_MODES)
    r.add_argument("--tag", default="", help="run ids become <config stem>_<tag>_seed<S>")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    b = sp.add_parser("build", help="a record folder from the logs")
    b.add_argument("--name", required=True)
    b.add_argument("--track", required=True, choices=TRACKS)
    b.add_argument("--logs", nargs="+", required=True)
    b.add_argument("--seeds", type=int, nargs="+", required=True)
    for opt in ("--github-id", "--author", "--blurb"):
        b.add_argument(opt, default="")
    ref = b.add_mutually_exclusive_group()
    ref.add_argument("--reference", help="comma-separated per-seed bpb of the record to beat")
    ref.add_argument("--reference-folder", help="a record folder: its logs' score lines (else its submission.json)")
    b.add_argument("--artifacts", nargs="+", help="one .ptz per seed, in seed order (copied into the folder)")
    b.add_argument("--config", help="the TOML the runs used (shipped; else config.json from the first log)")
    b.add_argument("--out", default="records")
    b.add_argument("--date", help="YYYY-MM-DD (default: today)")
    b.add_argument("--score-label", help="use this score line instead of the preference order")
    b.add_argument("--alpha", type=float, default=0.01)
    b.add_argument("--threshold-nats", type=float, default=0.005)
    sp.add_parser("validate", help="check any record folder").add_argument("folder")
    sp.add_parser("leaderboard", help="submission.json files under a folder, by val_bpb").add_argument("root", nargs="?", default="records")
    a = p.parse_args(argv)
    if a.cmd == "validate":
        return report(a.folder)
    return {"run": cmd_run, "build": cmd_build, "leaderboard": cmd_leaderboard}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
