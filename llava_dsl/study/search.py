"""The regime search: short naive runs (stage 1, then joint stage 2 with every step measured) under a few
settings, scored ONLY by their gradient statistics, never by accuracy.

Rule, fixed before any run: the study uses the candidate whose shallowest block group has the largest median
tr(Cov skip) / tr(Cov main) over the stage-2 windows (the paper's c, which it says is >> 1 early in joint
training); ties go to the earlier (cheaper) candidate. The candidates and the budget are constants here.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

from llava_dsl.checkpointing.atomic import atomic_write_text
from llava_dsl.demo.stage_flags import as_argv
from llava_dsl.study import stats
from llava_dsl.study.analysis import shallow_group, skip_groups
from llava_dsl.study.plan import Plan
from llava_dsl.study.runner import Units, say, train_flags

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
    from dataclasses import replace

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
    report = {"rule": __doc__.split("\n\n")[1].replace("\n", " "), "steps": SEARCH_STEPS,
              "candidates": results, "chosen": results[best]["name"]}
    atomic_write_text(os.path.join(units.output_dir, "search.json"), json.dumps(report, indent=1))
    say(f"search: chosen {report['chosen']} ({os.path.join(units.output_dir, 'search.json')})")
    return report
