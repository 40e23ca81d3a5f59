"""Measure honest noise and dishonest error of every verification metric; print the margins.

    python scripts/calibrate.py --model tiny --model ~/.cache/neuron/smollm2-135m --json calibration.json

The measurement itself is neuron/harness/calibration.py; docs/calibration.md explains it and the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from neuron.harness import calibration as cal  # noqa: E402
from neuron.validator.challenge import ChallengeConfig  # noqa: E402
from neuron.dataset import PromptSource  # noqa: E402
from neuron.harness import disagreements as dis  # noqa: E402
from neuron.harness.cheats import GENERATION, names  # noqa: E402
from neuron.model import load_model  # noqa: E402
from neuron.scoring import Thresholds  # noqa: E402


def batch_sizes(text: str) -> list[int]:
    """"1-16" or "1,2,4,8,16"."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def label_of(name: str) -> str:
    return name if name == "tiny" else Path(os.path.expanduser(name)).name.split("-")[0]


def run_model(name: str, args, th: Thresholds, cfg: ChallengeConfig) -> list[cal.Check]:
    label = label_of(name)
    t0 = time.perf_counter()
    ref = cal.Reference(load_model(name, args.device, args.ref_dtype))
    # The honest miners on --miner-device (a GPU: float16, bfloat16), judged by the reference on --device.
    miner_device = args.miner_device or args.device
    miners = {dt: (ref.lm if dt == args.ref_dtype and miner_device == args.device
                   else load_model(name, miner_device, dt)) for dt in args.dtypes}
    source, rng = PromptSource.default(), random.Random(args.seed)
    checks = cal.honest_run(ref, miners, source, rng, args.batch_sizes, cfg, th, model=label, rounds=args.rounds,
                            forward=not args.generation_only)
    t1 = time.perf_counter()
    print(f"{label}: {len(checks)} honest checks in {t1 - t0:.0f} s", file=sys.stderr)
    if args.dishonest:
        checks += cal.dishonest_run(ref, tuple(args.model_cheats), source, rng, args.dishonest, cfg, th, model=label,
                                    seed=args.seed)
        print(f"{label}: dishonest forward checks in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    if args.generation_cheats:
        t2 = time.perf_counter()
        checks += cal.generation_cheat_run(ref, tuple(args.cheats), source, rng, args.generation_cheats, cfg, th,
                                           model=label)
        print(f"{label}: generation cheats in {time.perf_counter() - t2:.0f} s", file=sys.stderr)
    return checks


def read_json(path: Path) -> dict:
    """A --json file, gzipped when its name ends in .gz."""
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def write_json(path: Path, data: dict) -> None:
    """Write a --json file, gzipped when its name ends in .gz (docs/calibration/ keeps them so)."""
    text = json.dumps(data, indent=None if path.suffix == ".gz" else 1).encode()
    path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)


def rounded(check: cal.Check) -> cal.Check:
    """The check with its per-token values to 6 significant digits, as a --json file stores them (they
    compress), so that a run's tables and a rescore of its file agree exactly."""
    return dataclasses.replace(check, margins=[float(f"{x:.6g}") for x in check.margins],
                               errors=[float(f"{x:.6g}") for x in check.errors])


def tables(summary: dict) -> str:
    """The summary as markdown tables."""
    out = []
    for model, s in summary["models"].items():
        out.append(f"### {model}\n")
        out.append(f"{s['checks']} checks, of which {s['honest_checks']} by honest miners in "
                   f"{' or '.join(cal.ACCEPTED_DTYPES)} ({s['honest_token_checks']} generated tokens checked); "
                   f"false rejections among those: {len(s['honest_false_rejections'])}. Checks (rejected) per "
                   "honest miner: " + ", ".join(f"{k} {n} ({s['rejected_by_miner'][k]})"
                                                for k, n in s["checks_by_miner"].items()) + ".\n")
        out.append("| metric | threshold | honest worst (fp32/fp16) | bf16 worst | dishonest best (kind) |")
        out.append("|---|---|---|---|---|")
        for m, t, h, b, closest in cal.margin_rows(summary, model):
            cheat = f"{cal.fmt(closest[0])} ({closest[1]})" if closest else "-"
            out.append(f"| {m} | {cal.fmt(t)} | {cal.fmt(h)} | {cal.fmt(b)} | {cheat} |")
        out.append("")
        out.append("Worst honest value per miner precision and batch size:\n")
        metrics = [m for m in cal.METRICS if m in s["worst_honest"]]
        out.append("| miner | batch | " + " | ".join(metrics) + " |")
        out.append("|---|---|" + "---|" * len(metrics))
        for miner, cells in s["worst_by_miner_batch"].items():
            for b, w in sorted(cells.items(), key=lambda kv: int(kv[0])):
                out.append(f"| {miner} | {b} | " + " | ".join(cal.fmt(w.get(m)) for m in metrics) + " |")
        out.append("")
        out.append("Dishonest miners: share caught per single challenge (generation: over the challenges a cheat "
                   "applies to, and over those where its tokens differ from the honest sampler's), and the first "
                   "failed check:\n")
        out.append("| kind | forward caught | generation caught | with that challenge's evidence | caught when "
                   "changed (changed/all) | reasons |")
        out.append("|---|---|---|---|---|---|")
        for kind, c in s["dishonest"].items():
            reasons = ", ".join(f"{r} x{n}" for r, n in c["reasons"].items())
            out.append(f"| {kind} | {cal.fmt(c['forward_caught'])} | {cal.fmt(c['generation_caught'])} | "
                       f"{cal.fmt(c['generation_caught_with_evidence'])} | "
                       f"{cal.fmt(c['generation_caught_when_changed'])} ({c['changed']}/{c['generations']}) | "
                       f"{reasons} |")
        out.append("")
    ev = summary.get("evidence")
    if ev:
        out.append("### Evidence across rounds (CUSUMs over token margins, logprob errors and disagreements)\n")
        out.append(f"Limits for {cal.fmt(ev['false_alarm_per_day'])} honest alarms per miner per day in all, at "
                   f"{ev['tokens_per_day']:.0f} tokens a day (shared evenly by the statistics), from each honest "
                   f"precision's bands (rate bound, top), the largest used (-: too few honest tokens to bound one):\n")
        out.append("| statistic | drift | honest miner | tokens | nonzero | mean | bands | largest honest CUSUM | limit |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for name, st in ev["statistics"].items():
            for dtype, d in st["by_dtype"].items():
                bands = ", ".join(f"({cal.fmt(p)}, {cal.fmt(b)})" for p, b in d["levels"])
                out.append(f"| {name} | {cal.fmt(st['drift'])} | {dtype} | {d['tokens']} | {d['nonzero']} | "
                           f"{cal.fmt(d['mean'])} | {bands} | {cal.fmt(d['max_cusum'])} | {cal.fmt(d['limit'])} |")
            out.append(f"| {name} | | **derived / in use** | | | | | | **{cal.fmt(st['limit_derived'])} / "
                       f"{cal.fmt(st['limit_used'])}** |")
        out.append("")
        out.append(f"| cheat | tokens | disagreement rate | mean margin | mean logprob error | flagged within "
                   f"{cal.WITHIN} tokens | tokens to flag (median / worst of {cal.ORDERS} orders) | by margins alone: "
                   f"within {cal.WITHIN} | median / worst |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for kind, c in ev["cheats"].items():
            b, m = c["both"], c["margins_alone"]
            out.append(f"| {kind} | {c['tokens']} | {cal.fmt(c['disagreement_rate'])} | {cal.fmt(c['mean_margin'])} | "
                       f"{cal.fmt(c['mean_error'])} | {cal.fmt(b['flagged_within'])} | "
                       f"{b['tokens_to_flag_median'] or 'never'} / {b['tokens_to_flag_worst'] or 'never'} | "
                       f"{cal.fmt(m['flagged_within'])} | "
                       f"{m['tokens_to_flag_median'] or 'never'} / {m['tokens_to_flag_worst'] or 'never'} |")
        out.append("")
    dv = summary.get("disagreements")
    if dv:
        out.append(disagreement_tables(dv))
    return "\n".join(out)


def disagreement_tables(dv: dict) -> str:
    """The disagreement evidence (neuron/harness/disagreements.py) as markdown tables."""
    out = ["### Evidence from disagreements (tokens that are not the reference sampler's choice)\n",
           f"D <- max(0, D + [margin > 0] - {cal.fmt(dv['drift'])}), flagged at {cal.fmt(dv['limit'])}: "
           f"{cal.fmt(dv['false_alarm_per_day'])} honest alarms per miner per day at {dv['tokens_per_day']:.0f} "
           f"tokens for any honest rate up to **{cal.fmt(dv['tolerated'])}**.\n",
           "| model | honest miner | tokens | disagreements | rate | 99.9% bound | dispersion | chi2 / df over "
           "(kind, batch) | limit at the bound | largest CUSUM: stored order / over days | days flagged |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, miners in dv["rates"].items():
        for miner, r in miners.items():
            key = f"{model} {miner}"
            h = dv["honest"].get(key, {})
            days = h.get("days", {})
            out.append(f"| {model} | {miner} | {r['tokens']} | {r['disagreements']} | {cal.fmt(r['rate'])} | "
                       f"{cal.fmt(r['bound'])} | {cal.fmt(r['dispersion'])} | {cal.fmt(r['chi2'])} / {r['df']} | "
                       f"{cal.fmt(dv['limit_at_bound'].get(key))} | {cal.fmt(h.get('stored_order_max'))} / "
                       f"{cal.fmt(days.get('max_cusum'))} | {round(days.get('flagged', 0) * days.get('streams', 0))} "
                       f"of {days.get('streams', 0)} |")
    out.append("")
    out.append("Per decode batch size (HF engine, greedy and sampled together): disagreements / tokens.\n")
    out.append("| model | honest miner | by batch size |")
    out.append("|---|---|---|")
    for model, miners in dv["rates"].items():
        for miner, r in miners.items():
            by_batch: dict = {}
            for key, cell in r["cells"].items():
                b = by_batch.setdefault(int(key.split()[-1]), [0, 0])
                b[0], b[1] = b[0] + cell["disagreements"], b[1] + cell["tokens"]
            out.append(f"| {model} | {miner} | " + ", ".join(f"{b}: {k}/{n}" for b, (k, n) in sorted(by_batch.items()))
                       + " |")
    out.append("")
    out.append(f"Tokens to flag (median / 99th percentile / worst), streams disagreeing at a multiple of "
               f"{dv['reference_model']}'s honest rate ({cal.fmt(dv['measured'])}), then each cheat's stored "
               "generations drawn with replacement:\n")
    out.append("| stream | rate | streams | flagged | median | 99th percentile | worst |")
    out.append("|---|---|---|---|---|---|---|")
    rows = [(f"{m} x honest", f) for m, f in dv["multiples"].items()] + list(dv["cheats"].items())
    for name, f in rows:
        out.append(f"| {name} | {cal.fmt(f['rate'])} | {f['streams']} | {cal.fmt(f['flagged'])} | "
                   f"{f['median'] or 'never'} | {f['p99'] or 'never'} | {f['worst'] or 'never'} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="tiny, a local path or a Hugging Face id (repeatable)")
    p.add_argument("--device", default="cpu", help="the validator's (the reference's) device")
    p.add_argument("--miner-device", default="", help="the honest miners' device (default: --device); e.g. cuda, "
                   "judged by a float32 reference on the CPU in the same process")
    p.add_argument("--ref-dtype", default="float32", help="the validator's precision")
    p.add_argument("--dtypes", default="float32,float16", help="honest miners' precisions (bfloat16 is measured, "
                   "not accepted)")
    p.add_argument("--batch-sizes", default="1-16", type=batch_sizes, help='e.g. "1-16" or "1,2,4,8,16"')
    p.add_argument("--rounds", type=int, default=1, help="repeat every batch size with fresh prompts")
    p.add_argument("--generation-only", action="store_true", help="honest miners: generation checks only")
    p.add_argument("--dishonest", type=int, default=16, help="Forward challenges to each model cheat (0: none)")
    p.add_argument("--generation-cheats", type=int, default=64,
                   help="seeded Generate challenges to each generation cheat (0: none)")
    p.add_argument("--cheats", default=",".join(names(GENERATION) + ("int8" + cal.EXACT, "int4" + cal.EXACT)),
                   help="generation cheats to run; KIND_exact reports exact logprobs from a teacher-forced pass")
    p.add_argument("--model-cheats", default=",".join(cal.FORWARD_CHEATS),
                   help="model cheats whose Forward is checked (neuron/harness/cheats/: a number after noise, "
                        "different sets its level)")
    p.add_argument("--tokens-per-day", type=float, default=1e6,
                   help="generated tokens a validator checks per miner a day (the evidence limit's horizon)")
    p.add_argument("--false-alarm", type=float, default=1e-6, help="honest evidence alarms per miner per day")
    p.add_argument("--different-relative", type=float,
                   help="'different' model: weight noise relative to each tensor's std (default 0.1; the same as "
                        "naming differentR in --model-cheats)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--positions", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--sampled-fraction", type=float, default=ChallengeConfig.sampled_fraction,
                   help="honest miners: share of sampled challenges (half of them with top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rescore", type=Path, action="append",
                   help="judge the checks of an earlier --json run under the current Thresholds instead of "
                        "measuring (repeatable)")
    p.add_argument("--json", type=Path, help="write the summary and every check here (gzipped: NAME.json.gz)")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    args = p.parse_args(argv)
    args.model = args.model or ["tiny"]
    args.dtypes = args.dtypes.split(",")
    args.cheats = [k for k in args.cheats.split(",") if k]
    args.model_cheats = [f"different{args.different_relative:g}" if k == "different" and args.different_relative
                         is not None else k for k in args.model_cheats.split(",") if k]
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    th = Thresholds()
    cfg = ChallengeConfig(seq_len=args.seq_len, positions=args.positions, topk=args.topk,
                          max_new_tokens=args.max_new_tokens, sampled_fraction=args.sampled_fraction)
    t0 = time.perf_counter()
    checks = []
    if args.rescore:
        for path in args.rescore:
            earlier = read_json(path)
            checks += [cal.rescored(cal.Check(**c), th) for c in earlier["checks"]]
    else:
        for name in args.model:
            checks += [rounded(c) for c in run_model(name, args, th, cfg)]
    summary = cal.summarize(checks, th)
    # The evidence limit is set on the real model's honest margins (all models' when it is absent).
    models = {c.model for c in checks}
    real = [m for m in models if m != "tiny"] or sorted(models)
    honest_gen = [c for c in checks if c.accepted and c.kind != "forward" and c.model in real]
    if honest_gen:
        by_cheat: dict = {}
        for c in checks:
            if not c.honest and c.kind != "forward" and c.model in real:
                by_cheat.setdefault(c.miner, []).append(c)
        summary["evidence"] = cal.evidence_summary(honest_gen, by_cheat, th, args.tokens_per_day, args.false_alarm)
        summary["evidence"]["models"] = sorted(real)
        # The honest disagreement rates of every model; the tokens to flag at multiples of the real model's.
        every = [c for c in checks if c.accepted and c.kind != "forward"]
        summary["disagreements"] = dis.disagreement_summary(every, by_cheat, th, args.tokens_per_day,
                                                            args.false_alarm, reference_model=sorted(real)[0])
    summary["settings"] = {**json.loads(json.dumps(vars(args), default=str)),
                           "challenge": dataclasses.asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
                           "torch": torch.__version__, "threads": torch.get_num_threads()}
    text = tables(summary)
    print(text)
    if args.json:
        summary["checks"] = [dataclasses.asdict(c) for c in checks]
        write_json(args.json, summary)
    if args.markdown:
        args.markdown.write_text(text)
    bad = sum(len(s["honest_false_rejections"]) for s in summary["models"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
