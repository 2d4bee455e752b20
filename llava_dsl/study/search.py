"""The regime search, two ways, never scored by accuracy and never by naive against detached.

``--criterion gradient``: short naive runs (stage 1, then joint stage 2 with every step measured) under a few
settings, scored ONLY by their gradient statistics.

Rule, fixed before any run: the study uses the candidate whose shallowest block group has the largest median
tr(Cov skip) / tr(Cov main) over the stage-2 windows (the paper's c, which it says is >> 1 early in joint
training); ties go to the earlier (cheaper) candidate. The candidates and the budget are constants here.

``--criterion mechanism``: per candidate in ``MECHANISM_CANDIDATES`` (one lever changed at a time), seed 0 at the
plan's scale: stage 1, the naive and the detached stage 2, then the damage probe (each arm's tower against the
pretrained tower at the main layer and the taps) and the use probe (tap ablation on both checkpoints).

Mechanism rule, fixed before any run: a candidate meets the criterion when BOTH (1) *use*: the naive arm's exact
match drops by at least 5 points when all its taps are replaced by their training means, and (2) *damage*: at the
shallowest tap, the naive arm's tower is below the pretrained tower's by more than 0.03 in pixel R^2 or by more
than 0.03 in glyph accuracy (joint training in the demo's regime moved that layer's pixel R^2 by at most 0.024,
either way, over three seeds). The study uses the first candidate, in list order, that meets it. If none does,
that is reported as a finding and the fallback is the candidate with the most halves met, then the largest naive
all-taps drop, then the largest shallow pixel-R^2 loss of the naive arm against the pretrained tower; ties go to
the earlier candidate.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from llava_dsl.checkpointing.atomic import atomic_write_text
from llava_dsl.demo.stage_flags import as_argv
from llava_dsl.study import stats
from llava_dsl.study.analysis import shallow_group, skip_groups
from llava_dsl.study.plan import REGIME, SHORT, Plan
from llava_dsl.study.runner import Units, damage_file, mechanism_units, say, seed_parts, stage_dir, train_flags, \
    use_dir

# Each candidate changes one thing at a time from the first; why each is tried is in docs/study.md.
CANDIDATES = (
    {"name": "dense-taps234-lr1e-4", "tower_variant": "dense", "skip_layers": "2,3,4", "detach_depth": 2,
     "tower_lr": 1e-4, "why": "the demo's taps and tower LR on the dense tower (no slot head)"},
    {"name": "dense-taps1234-lr1e-4", "tower_variant": "dense", "skip_layers": "1,2,3,4", "detach_depth": 3,
     "tower_lr": 1e-4, "why": "more and shallower taps: block 1 gets its own tap"},
    {"name": "dense-taps1234-lr1e-3", "tower_variant": "dense", "skip_layers": "1,2,3,4", "detach_depth": 3,
     "tower_lr": 1e-3, "why": "the same with a 10x higher tower LR (the tower moves, the skip gradient is applied)"},
)

SEARCH_STEPS = {"stage1_steps": 30, "stage2_steps": 40, "window": 10}


def candidate_plan(base: Plan, candidate: Dict) -> Plan:
    return replace(base, tower_variant=candidate["tower_variant"], skip_layers=candidate["skip_layers"],
                   detach_depth=candidate["detach_depth"], tower_lr=candidate["tower_lr"],
                   stage1_steps=SEARCH_STEPS["stage1_steps"], stage2_steps=SEARCH_STEPS["stage2_steps"],
                   grad_dense_steps=SEARCH_STEPS["stage2_steps"], grad_every=0, grad_window=SEARCH_STEPS["window"])


def score(grad: Dict) -> Dict:
    group = shallow_group(grad)
    rows = {}
    for name in skip_groups(grad):
        windows = [w["groups"][name] for w in grad["windows"] if name in w["groups"]]
        rows[name] = {key: [w.get(key) for w in windows] for key in
                      ("trcov_ratio", "cos_mean", "snr_main", "snr_full", "norm_main", "norm_skip")}
        rows[name]["median_trcov_ratio"] = stats.median(rows[name]["trcov_ratio"])
    return {"shallow_group": group, "median_trcov_ratio": rows[group]["median_trcov_ratio"], "groups": rows}


def run_search(output_dir: str, base: Plan, paths_for) -> Dict:
    """``paths_for(plan)``: the assets and data paths for a candidate's tower variant (built on first use).

    The stage-1 runs (one per tower and tap set) run side by side, then the candidates' stage-2 runs."""
    from concurrent.futures import ThreadPoolExecutor

    units = Units(os.path.join(output_dir, "search"), base.device)
    python = sys.executable
    runs = os.path.join(units.output_dir, "runs")
    plans = [candidate_plan(base, c) for c in CANDIDATES]
    paths = [paths_for(p) for p in plans]
    stage1 = {}
    for candidate, plan, where in zip(CANDIDATES, plans, paths):
        key = f"{candidate['tower_variant']}-taps{candidate['skip_layers'].replace(',', '')}"
        folder = os.path.join(runs, f"llava-{key}-stage1")
        stage1.setdefault(key, (f"stage1-{key}", [python, "-m", "llava_dsl.train"]
                                + train_flags(plan, where, "mlp_multilayer", 1, folder, 0), folder))
    with ThreadPoolExecutor(max_workers=len(stage1)) as pool:
        list(pool.map(lambda job: units.run(job[0], job[1], clear=[job[2]]), stage1.values()))

    def stage2(index: int) -> Dict:
        candidate, plan, where = CANDIDATES[index], plans[index], paths[index]
        key = f"{candidate['tower_variant']}-taps{candidate['skip_layers'].replace(',', '')}"
        folder = os.path.join(runs, f"llava-{candidate['name']}-stage2")
        argv = [python, "-m", "llava_dsl.train"] + train_flags(
            plan, where, "mlp_multilayer", 2, folder, 0, os.path.join(stage1[key][2], "mm_projector.bin"))
        units.run(f"stage2-{candidate['name']}", argv + as_argv({"save_strategy": "no"}), clear=[folder])
        with open(os.path.join(folder, "dsl_grad_stats.json"), encoding="utf-8") as f:
            grad = json.load(f)
        result = {**candidate, **score(grad), "seconds": units.record(f"stage2-{candidate['name']}")["seconds"]}
        say(f"search {candidate['name']}: shallowest group {result['shallow_group']}, median tr(Cov) ratio "
            f"{result['median_trcov_ratio']:.3f}")
        return result

    with ThreadPoolExecutor(max_workers=len(CANDIDATES)) as pool:
        results: List[Dict] = list(pool.map(stage2, range(len(CANDIDATES))))
    best = max(range(len(results)), key=lambda i: (results[i]["median_trcov_ratio"], -i))
    report = {"rule": __doc__.split("\n\n")[2].replace("\n", " "), "steps": SEARCH_STEPS,
              "candidates": results, "chosen": results[best]["name"]}
    atomic_write_text(os.path.join(units.output_dir, "search.json"), json.dumps(report, indent=1))
    say(f"search: chosen {report['chosen']} ({os.path.join(units.output_dir, 'search.json')})")
    return report


# ------------------------------------------------------------------------------------------ by the mechanism

# Each changes one lever from the one before it is named after; the data mix first (the paper's stage 2 is mostly
# not reading), then confusable glyphs, then the tower LR. The tower, taps and detach depth stay REGIME's.
MECHANISM_CANDIDATES = (
    {"name": "reading", "stage2_data": "reading", "read_fraction": 0.2, "confusable": False,
     "tower_lr": REGIME["tower_lr"], "why": "today's stage 2: every question asks for the string"},
    {"name": "mix0.2", "stage2_data": "mix", "read_fraction": 0.2, "confusable": False,
     "tower_lr": REGIME["tower_lr"], "why": "reading a fifth of stage 2, the rest colour, position, count, shape"},
    {"name": "mix0.1", "stage2_data": "mix", "read_fraction": 0.1, "confusable": False,
     "tower_lr": REGIME["tower_lr"], "why": "reading a tenth"},
    {"name": "mix0.2-confusable", "stage2_data": "mix", "read_fraction": 0.2, "confusable": True,
     "tower_lr": REGIME["tower_lr"], "why": "mix0.2 with letters confusable with digits (O/0, l/1/I, S/5, B/8)"},
    {"name": "mix0.2-lr3e-3", "stage2_data": "mix", "read_fraction": 0.2, "confusable": False,
     "tower_lr": 3 * REGIME["tower_lr"], "why": "mix0.2 with a 3x higher tower LR (the tower moves more)"},
)

MIN_USE_DROP = 0.05                                          # exact match, naive arm, all taps ablated
DAMAGE_MARGIN = {"pixel_r2": 0.03, "glyph_accuracy": 0.03}   # naive below pretrained at the shallowest tap
MECHANISM_SEED = 0


def _tower_entry(damage: Dict, checkpoint: str) -> Dict:
    by_path = {os.path.abspath(k): v for k, v in damage["checkpoints"].items()}
    entry = by_path.get(os.path.abspath(checkpoint))
    if entry is None:
        raise ValueError(f"damage report: no tower for {checkpoint} (has {sorted(by_path)})")
    return entry


def mechanism_verdict(damage: Dict, use_naive: Dict, naive: str, use_detached: Optional[Dict] = None,
                      detached: Optional[str] = None) -> Dict:
    """The mechanism rule (module docstring) on one candidate's probe outputs: ``damage``, the damage probe's
    report; ``use_naive`` / ``use_detached``, the use probe's reports; ``naive`` / ``detached``, the checkpoint
    folders as named in the damage report."""
    if not damage.get("reference"):
        raise ValueError("damage report: no reference (pretrained) tower; the criterion compares against it")
    naive_entry = _tower_entry(damage, naive)
    shallow = str(min(naive_entry["taps"]))
    pretrained = damage["reference"]["layers"][shallow]
    towers = {"pretrained": pretrained, "naive": naive_entry["layers"][shallow]}
    if detached is not None:
        towers["detached"] = _tower_entry(damage, detached)["layers"][shallow]
    loss = {m: pretrained[m] - towers["naive"][m] for m in DAMAGE_MARGIN}
    drops = {"naive": use_naive["conditions"]["all_taps"]["drop"]}
    exact = {"naive": use_naive["conditions"]["none"]["exact_match"]}
    if use_detached is not None:
        drops["detached"] = use_detached["conditions"]["all_taps"]["drop"]
        exact["detached"] = use_detached["conditions"]["none"]["exact_match"]
    use_met = drops["naive"] >= MIN_USE_DROP
    damage_met = any(loss[m] > DAMAGE_MARGIN[m] for m in DAMAGE_MARGIN)
    return {"shallowest_tap": int(shallow), "probe_at_shallowest_tap": towers, "naive_loss_vs_pretrained": loss,
            "all_taps_drop": drops, "exact_match": exact, "use_met": use_met, "damage_met": damage_met,
            "meets": use_met and damage_met}


def choose(verdicts: Sequence[Dict]) -> Dict:
    """The first candidate meeting the rule; else the fallback of the module docstring, flagged as such."""
    for i, v in enumerate(verdicts):
        if v["meets"]:
            return {"index": i, "met": True}
    best = max(range(len(verdicts)), key=lambda i: (
        verdicts[i]["use_met"] + verdicts[i]["damage_met"], verdicts[i]["all_taps_drop"]["naive"],
        verdicts[i]["naive_loss_vs_pretrained"]["pixel_r2"], -i))
    return {"index": best, "met": False}


def mechanism_table(report: Dict) -> str:
    """The search's markdown table: every candidate's probe numbers and what the rule said."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = ["| candidate | why | naive EM / all-taps drop | detached EM / all-taps drop | shallowest tap | "
             "pixel R² pretrained / naive / detached | glyph acc. pretrained / naive / detached | use | damage | "
             "meets |", "|" + "---|" * 10]
    for c in report["candidates"]:
        v, t = c["verdict"], c["verdict"]["probe_at_shallowest_tap"]
        probe = {m: " / ".join(f"{t[k][m]:.3f}" if k in t else "-" for k in ("pretrained", "naive", "detached"))
                 for m in ("pixel_r2", "glyph_accuracy")}
        lines.append(f"| {c['name']} | {c['why']} | {pct(v['exact_match']['naive'])} / "
                     f"{pct(v['all_taps_drop']['naive'])} | {pct(v['exact_match'].get('detached'))} / "
                     f"{pct(v['all_taps_drop'].get('detached'))} | {v['shallowest_tap']} | {probe['pixel_r2']} | "
                     f"{probe['glyph_accuracy']} | {'yes' if v['use_met'] else 'no'} | "
                     f"{'yes' if v['damage_met'] else 'no'} | {'**yes**' if v['meets'] else 'no'} |")
    chosen = report["chosen"]
    lines.append("")
    lines.append(f"Chosen: **{chosen}**" + ("" if report["criterion_met"] else
                                            " by the fallback rule: no candidate met the criterion (a finding: the "
                                            "mechanism did not appear in these settings)."))
    return "\n".join(lines) + "\n"


def run_mechanism_search(output_dir: str, base: Plan, paths_for) -> Dict:
    """Seed 0 of every mechanism candidate at ``base``'s scale; writes ``search-mechanism/search.json`` and
    ``search.md``. Stage 1 trains only the projector over the frozen tower on the rendered pretraining set, so one
    stage 1 serves every candidate (their levers act in stage 2)."""
    python, seed = sys.executable, MECHANISM_SEED
    root = os.path.join(output_dir, "search-mechanism")
    plans = [replace(base, **{k: c[k] for k in ("stage2_data", "read_fraction", "confusable", "tower_lr")})
             for c in MECHANISM_CANDIDATES]
    shared = Units(root, base.device)
    first = seed_parts(shared, plans[0], paths_for(plans[0]), seed)  # the seed's LM and use sample, shared
    stage1 = stage_dir(root, seed, "mlp_multilayer", 1)
    shared.run(f"seed{seed}-stage1-multi", [python, "-m", "llava_dsl.train"]
               + train_flags(plans[0], first, "mlp_multilayer", 1, stage1, seed), clear=[stage1])
    adapter = os.path.join(stage1, "mm_projector.bin")
    arms = ("mlp_multilayer", "detached_mlp_multilayer")
    results = []
    for candidate, plan in zip(MECHANISM_CANDIDATES, plans):
        units = Units(os.path.join(root, candidate["name"]), base.device)
        data = paths_for(plan)
        paths = {**first, "finetune": data["finetune"], "finetune_image_folder": data.get("finetune_image_folder")}
        for projector in arms:
            folder = stage_dir(units.output_dir, seed, projector, 2)
            units.run(f"seed{seed}-stage2-{SHORT[projector]}", [python, "-m", "llava_dsl.train"]
                      + train_flags(plan, paths, projector, 2, folder, seed, adapter))
        mechanism_units(units, plan, paths, seed, arms=arms)
        with open(damage_file(units.output_dir, seed), encoding="utf-8") as f:
            damage = json.load(f)
        use = {}
        for projector in arms:
            with open(os.path.join(use_dir(units.output_dir, seed, projector), "use.json"), encoding="utf-8") as f:
                use[projector] = json.load(f)
        verdict = mechanism_verdict(damage, use["mlp_multilayer"], stage_dir(units.output_dir, seed, arms[0], 2),
                                    use["detached_mlp_multilayer"], stage_dir(units.output_dir, seed, arms[1], 2))
        results.append({**candidate, "verdict": verdict, "damage": damage, "use": {
            SHORT[p]: {k: v for k, v in use[p].items() if k != "per_question_correct"} for p in arms}})
        say(f"search {candidate['name']}: use {'met' if verdict['use_met'] else 'not met'} (naive all-taps drop "
            f"{100 * verdict['all_taps_drop']['naive']:.1f} points), damage "
            f"{'met' if verdict['damage_met'] else 'not met'} (naive - pretrained at hidden state "
            f"{verdict['shallowest_tap']}: {verdict['naive_loss_vs_pretrained']})")
    pick = choose([r["verdict"] for r in results])
    report = {"rule": __doc__.split("\n\n")[4].replace("\n", " "), "seed": seed, "plan": base.to_json(),
              "candidates": results, "chosen": results[pick["index"]]["name"], "criterion_met": pick["met"]}
    atomic_write_text(os.path.join(root, "search.json"), json.dumps(report, indent=1))
    atomic_write_text(os.path.join(root, "search.md"), mechanism_table(report))
    say(f"search: chosen {report['chosen']} ({'meets the criterion' if pick['met'] else 'fallback: none met it'}); "
        f"{os.path.join(root, 'search.md')}")
    return report
