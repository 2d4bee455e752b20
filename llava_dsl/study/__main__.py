"""``python -m llava_dsl.study``: single layer vs naive multi-layer vs Detached Skip-Links, over seeds, measured
per claim of the paper (gradient interference, accuracy and stability, R-Probe). See docs/study.md.

    python -m llava_dsl.study [run] [--scale 4] [--seeds 0,...,7] [--output_dir study_output] [--device cpu]
    python -m llava_dsl.study --quick --output_dir study_quick   the whole pipeline, small (2 seeds, scale 1)
    python -m llava_dsl.study run --stage2_data mix --read_fraction 0.2   stage 2 on a mix, reading a minority
    python -m llava_dsl.study search [--output_dir ...]     the regime search (gradient statistics only)
    python -m llava_dsl.study search --criterion mechanism  the regime search by the damage and use probes
    python -m llava_dsl.study report [--output_dir ...]     tables, JSON and figures from what has finished
    python -m llava_dsl.study report --results FILE        a committed results.json's tables under today's rules

``run`` skips every unit that finished before (same plan), so rerunning the same command after a crash or a
kill continues; ``report`` runs on partial results too. The study is not a test and never runs in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import MISSING, replace
from typing import Dict, Optional, Sequence

from llava_dsl.checkpointing.atomic import atomic_write_text
from llava_dsl.demo.stage_flags import claim_output_dir
from llava_dsl.study.plan import DEFAULT_SCALE, DEFAULT_SEEDS, FULL_SEEDS, QUICK, Plan, PlanError, make_plan, \
    parse_seeds
from llava_dsl.study.runner import MARKER, StudyError, Units, load_json, run_seed, say, seed_parts


def build_paths(output_dir: str, plan: Plan, assets_root: Optional[str], override: Dict[str, Optional[str]]) -> Dict:
    """The pretrained tower and LM (asset cache, built on first use) and the data set, as paths."""
    from llava_dsl.assets.ocr_data import OcrDataConfig, build as build_data

    if override.get("vision_tower") and override.get("llm"):
        models = {"vision_tower": os.path.abspath(override["vision_tower"]), "llm": os.path.abspath(override["llm"])}
        for key, folder in (("tower_report", models["vision_tower"]), ("lm_report", models["llm"])):
            if os.path.isfile(os.path.join(folder, "BUILD.json")):  # a folder of the asset cache: keep its report
                models[key] = os.path.join(folder, "BUILD.json")
    else:
        from llava_dsl.assets.pretrained import build

        built = build(plan.tower_variant, root=assets_root, lm_variant=plan.lm_variant,
                      log=lambda message: say(f"assets: {message}"))
        models = {k: built[k] for k in ("vision_tower", "llm", "tower_report", "lm_report")}
    data = build_data(os.path.join(output_dir, "data", f"digits-{plan.image_size}px"),
                      OcrDataConfig(seed=plan.data_seed, image_size=plan.image_size, num_pretrain=plan.num_pretrain,
                                    num_finetune=plan.num_finetune, num_heldout=plan.num_heldout,
                                    num_textvqa=8, num_ocrbench=8, content="digits",
                                    min_digits=plan.min_digits, max_digits=plan.max_digits))
    if plan.stage2_data == "mix":  # stage 2 reads the mix; stage 1, the probes' renders and the held-out OCR do not
        from llava_dsl.assets.data_mix import MixConfig, build as build_mix

        mix = build_mix(os.path.join(output_dir, "data", f"mix-{plan.image_size}px-read{plan.read_fraction:g}"
                                                         + ("-confusable" if plan.confusable else "")),
                        MixConfig(seed=plan.data_seed, image_size=plan.image_size, num_finetune=plan.num_finetune,
                                  num_eval=8, read_fraction=plan.read_fraction, confusable=plan.confusable,
                                  min_chars=plan.min_digits, max_chars=plan.max_digits))
        data = {**data, "finetune": mix["finetune"], "finetune_image_folder": mix["image_folder"]}
    return {**models, **data}


def claim(output_dir: str) -> None:
    claim_output_dir(output_dir, MARKER, "the study",
                     "python -m llava_dsl.study; rerunning the same command continues it", StudyError)


def check_output_dir(output_dir: str, plan: Plan) -> Plan:
    """A new folder gets the marker and plan.json; an old one must hold the same plan (else refused). Returns
    the plan with every seed the folder's study has (seeds may be added to a finished study)."""
    plan_file = os.path.join(output_dir, "plan.json")
    claim(output_dir)
    wanted = plan.to_json()
    recorded = load_json(plan_file)
    if recorded is not None:
        # more seeds may be added to a finished study; anything else must match
        # a field the recorded plan predates ran with its default (e.g. stage2_data "reading")
        recorded = {**{k: f.default for k, f in Plan.__dataclass_fields__.items() if f.default is not MISSING},
                    **recorded}
        changed = sorted(k for k in set(recorded) | set(wanted) if k != "seeds" and recorded.get(k) != wanted.get(k))
        if changed:
            raise StudyError(f"--output_dir {output_dir} holds a study with another plan (differs in "
                             f"{', '.join(f'{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}' for k in changed)}); "
                             f"use a new --output_dir to run this one")
        wanted["seeds"] = sorted(set(recorded["seeds"]) | set(wanted["seeds"]))
    atomic_write_text(plan_file, json.dumps(wanted, indent=1))
    return replace(plan, seeds=tuple(wanted["seeds"]))


def load_paths(output_dir: str, plan: Plan, assets_root, override) -> Dict:
    """Paths of the first run are kept (paths.json), so a resumed study uses the same tower and LM even if the
    asset cache was rebuilt meanwhile."""
    path_file = os.path.join(output_dir, "paths.json")
    paths = load_json(path_file)
    if paths is not None and all(os.path.exists(p) for p in paths.values()):
        return paths
    paths = build_paths(output_dir, plan, assets_root, override)
    atomic_write_text(path_file, json.dumps(paths, indent=1))
    return paths


def run_study(output_dir: str, plan: Plan, jobs: int, assets_root, override) -> None:
    started = time.time()
    wanted = plan.seeds
    plan = check_output_dir(output_dir, plan)
    paths = load_paths(output_dir, plan, assets_root, override)
    say(f"plan: {plan.to_json()}; running seeds {list(wanted)}")
    units = Units(output_dir, plan.device)
    # the seeds' own parts (LM initialisation, held-out sets) are built here, before the threads: importing
    # transformers from two threads at once can fail in its lazy module
    parts = {seed: seed_parts(units, plan, paths, seed) for seed in wanted}
    errors = []
    report_lock = threading.Lock()

    def worker(seeds: Sequence[int]) -> None:
        for seed in seeds:
            try:
                run_seed(units, plan, parts[seed], seed)
            except Exception as error:  # noqa: BLE001 - reported below with the seed, the others go on
                errors.append((seed, error))
                say(f"seed {seed} stopped: {error}")
                continue
            try:
                with report_lock:
                    write_report(output_dir, quiet=True)  # partial results land as seeds finish
            except Exception as error:  # noqa: BLE001 - the report is redone at the end
                say(f"partial report after seed {seed} failed: {error!r}")

    # seeds are independent chains; `jobs` of them run side by side (each unit is one single-threaded process)
    lanes = [list(wanted[i::jobs]) for i in range(min(jobs, len(wanted)))]
    threads = [threading.Thread(target=worker, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.time() - started
    state_file = os.path.join(output_dir, "wall_seconds.json")
    previous = load_json(state_file) or {}
    sessions = previous.get("sessions", []) + [{"seconds": round(elapsed, 1), "jobs": jobs,
                                                "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                "argv": sys.argv, "errors": [str(e) for _, e in errors]}]
    atomic_write_text(state_file, json.dumps({"sessions": sessions}, indent=1))
    write_report(output_dir)
    if errors:
        raise StudyError("; ".join(f"seed {s}: {e}" for s, e in errors))
    say(f"study done in {elapsed:.0f}s; {output_dir}/results.json, results.md, figures/")


def write_report(output_dir: str, quiet: bool = False) -> Dict:
    from llava_dsl.study.report import write

    return write(output_dir, quiet=quiet)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava_dsl.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "search", "report"), default="run")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"multiply steps, probe steps and held-out questions (default {DEFAULT_SCALE:g}: 480 "
                             f"joint steps, 1,000 questions per seed)")
    parser.add_argument("--seeds", default=None,
                        help=f"comma-separated seeds (default {','.join(map(str, DEFAULT_SEEDS))}); each sets data "
                             f"order, projector and LM initial weights and the held-out sample, for all arms alike")
    parser.add_argument("--quick", action="store_true",
                        help=f"the whole pipeline small: scale {QUICK['scale']:g}, seeds "
                             f"{','.join(map(str, QUICK['seeds']))} (minutes; its models do not read yet)")
    parser.add_argument("--output_dir", "--output-dir", default="study_output")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (default 1)")
    parser.add_argument("--assets_root", "--assets-root", default=None,
                        help="asset cache (default $LLAVA_DSL_ASSETS, else ~/.cache/llava_dsl/assets)")
    parser.add_argument("--vision_tower", default=None, help="use this tower instead of the cached one (smoke runs)")
    parser.add_argument("--llm", default=None, help="use this LM instead of the cached one (smoke runs)")
    parser.add_argument("--stage2_data", "--stage2-data", default="reading", choices=("reading", "mix"),
                        help="stage-2 supervision for every arm: reading (every question asks for the string, the "
                             "default) or mix (llava_dsl.assets.data_mix: reading a minority); the held-out OCR "
                             "evaluation is the rendered reading set either way")
    parser.add_argument("--read_fraction", "--read-fraction", type=float, default=0.2,
                        help="with --stage2_data mix: the share of reading questions (default 0.2)")
    parser.add_argument("--confusable", action="store_true",
                        help="with --stage2_data mix: strings mix digits with confusable letters "
                             "(O/0, l/1/I, S/5, B/8)")
    parser.add_argument("--criterion", default="gradient", choices=("gradient", "mechanism"),
                        help="search: score candidates by gradient statistics (default) or by the damage and use "
                             "probes (llava_dsl/study/search.py states both rules)")
    parser.add_argument("--results", default=None,
                        help="report: print the tables of this results.json under the current analysis")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise PlanError(f"--jobs {args.jobs}: expected a positive integer")
        if args.stage2_data == "reading" and (args.confusable or args.read_fraction != 0.2):
            raise PlanError("--read_fraction / --confusable: they shape the data mix; add --stage2_data mix")
        if bool(args.vision_tower) != bool(args.llm):
            raise PlanError("--vision_tower and --llm: give both or neither")
        base = QUICK if args.quick else {"scale": DEFAULT_SCALE, "seeds": DEFAULT_SEEDS, "full_seeds": FULL_SEEDS}
        plan = make_plan(base["scale"] if args.scale is None else args.scale,
                         base["seeds"] if args.seeds is None else parse_seeds(args.seeds), args.device,
                         full_seeds=base["full_seeds"], stage2_data=args.stage2_data,
                         read_fraction=args.read_fraction, confusable=args.confusable)
        output_dir = os.path.abspath(args.output_dir)
        override = {"vision_tower": args.vision_tower, "llm": args.llm}
        if args.command == "run":
            run_study(output_dir, plan, args.jobs, args.assets_root, override)
        elif args.command == "report" and args.results:
            from llava_dsl.study.report import reanalyse

            print(reanalyse(args.results))
        elif args.command == "report":
            if not os.path.isfile(os.path.join(output_dir, "plan.json")):
                raise StudyError(f"--output_dir {output_dir}: no plan.json; run the study there first")
            write_report(output_dir)
        else:
            from llava_dsl.study.search import run_mechanism_search, run_search

            claim(output_dir)

            def paths_for(candidate: Plan) -> Dict:
                folder = os.path.join(output_dir, "search", candidate.tower_variant)
                os.makedirs(folder, exist_ok=True)
                return build_paths(folder, candidate, args.assets_root, override)

            (run_mechanism_search if args.criterion == "mechanism" else run_search)(output_dir, plan, paths_for)
    except (PlanError, StudyError) as error:
        raise SystemExit(f"llava_dsl.study: {error}") from None


if __name__ == "__main__":
    main()
