"""The study's outputs from what has finished: ``results.json`` (every seed's numbers, summaries, paired
differences, verdicts), ``results.md`` (the tables) and ``figures/study_*.png`` (drawn with ``llava_dsl.plots``)."""
from __future__ import annotations

import json
import os
import platform
from typing import Dict

from llava_dsl.checkpointing.atomic import atomic_write_text
from llava_dsl.plots import interval_plot, plot_curves, save_png
from llava_dsl.study import stats
from llava_dsl.study.analysis import METRICS, collect_seed, summarise
from llava_dsl.study.plan import ARMS, SHORT, Plan
from llava_dsl.study.runner import load_json


def _plan(output_dir: str) -> Plan:
    with open(os.path.join(output_dir, "plan.json"), encoding="utf-8") as f:
        return plan_from_json(json.load(f))


def plan_from_json(raw: Dict) -> Plan:
    fields = {k: v for k, v in raw.items() if k in Plan.__dataclass_fields__}
    fields["seeds"] = tuple(fields["seeds"])
    fields["fixed_theta_points"] = tuple(fields["fixed_theta_points"])
    return Plan(**fields)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _ms(summary: Dict, digits: int = 3) -> str:
    if summary["mean"] is None:
        return "–"
    if summary["n"] < 2:  # one seed: no spread to show
        return _fmt(summary["mean"], digits)
    return f"{_fmt(summary['mean'], digits)} ± {_fmt(summary['std'], 2)}"


def _interval(result: Dict, digits: int = 3) -> str:
    if result.get("ci") is None:
        return "–"
    return f"[{_fmt(result['ci'][0], digits)}, {_fmt(result['ci'][1], digits)}]"


def _ci(result: Dict, digits: int = 3) -> str:
    return "–" if result.get("ci") is None else f"{_fmt(result['mean'], digits)} {_interval(result, digits)}"


def _p(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def primary_text(primary: Dict) -> str:
    """The pre-declared primary analysis in a few lines (docs/study.md quotes it)."""
    cmh = primary.get("cmh")
    lines = [f"**Primary (pre-declared): held-out exact match, detached − naive, paired by seed: "
             f"{primary['verdict']}.**", "",
             f"- per-seed differences (points): {', '.join(_fmt(d) for d in primary['differences'])}",
             f"- paired t over {primary['n']} seeds: mean {_fmt(primary['mean'])}, 95 % t-interval "
             f"{_interval(primary)}, t = {_fmt(primary['t'])}, df = {primary['df']}, p = {_p(primary['p'])}",
             f"- smallest effect this run could detect at 80 % power: "
             + (f"±{_fmt(primary['detectable'])} points" if primary["detectable"] is not None
                else "undefined (the differences have no spread)")]
    if cmh is not None:
        seeds = ", ".join(f"{s['b']}/{s['c']} (p = {s['p']:.3g})" for s in cmh["per_stratum"])
        lines.append(f"- Cochran–Mantel–Haenszel over seeds (questions only naive / only detached read): "
                     f"{cmh['b']}/{cmh['c']}, χ² = {_fmt(cmh['statistic'])}, p = {_p(cmh['p'])}; "
                     f"McNemar per seed: {seeds}")
    return "\n".join(lines) + "\n"


NAMES = {"exact_match": "held-out exact match %", "char_accuracy": "held-out character accuracy %",
         "handwritten_exact_match": "handwritten exact match %",
         "final_loss": "stage-2 final loss", "spikes": "loss spikes (count)",
         "tower_grad_norm_max": "tower grad norm, max", "tower_grad_norm_cv": "tower grad norm, CV",
         "rprobe_steps_to_threshold": "R-Probe steps to threshold", "rprobe_final_mse": "R-Probe final MSE"}


def tables(result: Dict) -> str:
    seeds = result["seeds"]
    summary = result["summary"]
    lines = []
    lines.append("### Per seed\n")
    header = "| metric | arm | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " | mean ± std |"
    lines += [header, "|" + "---|" * (3 + len(seeds))]
    for name, (path, _) in METRICS.items():
        for projector in ARMS:
            values = summary["per_arm"][projector][name]["values"]
            if all(v is None for v in values):
                continue
            lines.append(f"| {NAMES[name]} | {SHORT[projector]} | " + " | ".join(_fmt(v) for v in values)
                         + f" | {_ms(summary['per_arm'][projector][name])} |")
    lines.append("\n### Paired: detached − naive (same seed)\n")
    lines.append(primary_text(summary["primary"]))
    lines += ["| metric | role | better | per-seed differences | mean [95 % t-interval] | p | p (Holm) | "
              "detectable at 80 % | reading |", "|---|---|---|---|---|---|---|---|---|"]
    for name, paired in summary["paired_detached_minus_naive"].items():
        primary = name == "exact_match"
        lines.append(f"| {NAMES[name]} | {'primary' if primary else 'secondary'} | {paired['better']} | "
                     f"{', '.join(_fmt(d) for d in paired['differences'])} | {_ci(paired)} | {_p(paired['p'])} | "
                     f"{'–' if primary else _p(paired['p_holm'])} | {_fmt(paired['detectable'])} | "
                     f"{summary['primary']['verdict'] if primary else paired['reading']} |")
    lines.append("\n### Paired against the single-layer projector (same seed; described, Holm over these four)\n")
    lines += ["| difference | per-seed | mean [95 % t-interval] | p | p (Holm) |", "|---|---|---|---|---|"]
    for name, paired in summary["paired_vs_single"].items():
        lines.append(f"| {name} | {', '.join(_fmt(d) for d in paired['differences'])} | {_ci(paired)} | "
                     f"{_p(paired['p'])} | {_p(paired['p_holm'])} |")
    lines.append("\n### Gradient interference at fixed θ (learning rate 0, one window over every minibatch)\n")
    lines += ["| θ | group | tr(Cov) skip / main | cos(g_main, g_skip) | SNR main | SNR main+skip | "
              "SNR gain without skip | per-seed ratio | described: ratio > 1 / |cos| < 0.2 / SNR rises |",
              "|---|---|---|---|---|---|---|---|---|"]
    for point, entry in summary["fixed_theta"].items():
        for group, row in entry["groups"].items():
            mark = " (shallowest)" if group == entry["shallow_group"] else ""
            lines.append(f"| {point} | {group}{mark} | {_ms(row['trcov_ratio'])} | {_ms(row['cos_mean'], 2)} | "
                         f"{_ms(row['snr_main'], 2)} | {_ms(row['snr_full'], 2)} | "
                         f"{_ms(row['snr_gain_without_skip'], 2)} | "
                         f"{', '.join(_fmt(v) for v in row['trcov_ratio']['values'])} | "
                         f"{row['ratio_above_1']} / {row['cos_near_0']} / {row['snr_rises_without_skip']} |")
    lines += tap_table(summary["fixed_theta"])
    lines += damage_table(seeds)
    lines += use_table(seeds)
    lines.append("\n### Gradient interference over training windows (shallowest group)\n")
    lines += ["| seed | arm | windows | tr(Cov) ratio: first → last (median) | cos: first → last | "
              "SNR main / SNR main+skip (median) |", "|---|---|---|---|---|---|"]
    for s in seeds:
        for projector in ("mlp_multilayer", "detached_mlp_multilayer"):
            grad = s["arms"][projector].get("grad")
            if not grad:
                continue
            group = grad["shallow_group"]
            w = grad["windows"][group]
            ratio = [x["value"] for x in w["trcov_ratio"] if x["value"] is not None]
            cos = [x["value"] for x in w["cos_mean"] if x["value"] is not None]
            sm = [x["value"] for x in w["snr_main"] if x["value"] is not None]
            sf = [x["value"] for x in w["snr_full"] if x["value"] is not None]
            if not ratio:
                continue
            lines.append(f"| {s['seed']} | {SHORT[projector]} | {len(ratio)} | {_fmt(ratio[0])} → {_fmt(ratio[-1])} "
                         f"({_fmt(stats.median(ratio))}) | {_fmt(cos[0], 2)} → {_fmt(cos[-1], 2)} | "
                         f"{_fmt(stats.median(sm), 2)} / {_fmt(stats.median(sf), 2)} |")
    return "\n".join(lines) + "\n"


TAP_KEYS = (("trcov_ratio", "tr(Cov) tap / main"), ("norm_ratio", "‖g_tap‖ / ‖g_main‖"), ("snr_tap", "SNR of the tap"),
            ("cos_mean", "cos(g_main, g_tap)"), ("cos_of_means", "cos of the means"))


def tap_table(fixed: Dict) -> list:
    """Per-tap interference at fixed θ on the shallowest group, every point and arm: larger and noisier told
    apart (mean ± std over seeds; described, not tested)."""
    lines = []
    for point, entry in fixed.items():
        row = entry["groups"].get(entry["shallow_group"]) if entry["shallow_group"] else None
        taps = sorted({k.split("/")[0] for k in (row or {}) if k.startswith("tap") and "/" in k},
                      key=lambda t: int(t[3:]))
        if not taps:
            continue
        if not lines:
            lines = ["\n### Gradient interference per tap at fixed θ (shallowest group; described)\n",
                     "| θ | tap | " + " | ".join(name for _, name in TAP_KEYS) + " |",
                     "|---|---|" + "---|" * len(TAP_KEYS)]
        for tap in taps:
            lines.append(f"| {point} | {tap[3:]} | " + " | ".join(_ms(row[f"{tap}/{key}"], 2) for key, _ in TAP_KEYS)
                         + " |")
        gain = row["snr_gain_if_detached"]
        lines.append(f"| {point} | SNR main + summed skip {_ms(row['snr_full'], 2)}; without the detached taps: "
                     f"gain {_ms(gain, 2)} ({row['snr_rises_if_detached']}) |" + " |" * len(TAP_KEYS))
    return lines


def use_table(seeds) -> list:
    """Tap ablation: each multi-layer arm's exact-match drop (points) with a tap's slice replaced by its training
    mean (mean ± std over the seeds that ran it, then per seed). Described, not tested."""
    conditions = list(dict.fromkeys(c for s in seeds for p in ARMS for c in (s["arms"][p].get("use") or {})))
    if not conditions:
        return []
    lines = ["\n### Mechanism: use of the taps (exact-match drop in points when a tap's input is replaced by its "
             "training mean; described)\n", "| arm | ablated | drop, mean ± std | per seed |", "|---|---|---|---|"]
    for projector in ("mlp_multilayer", "detached_mlp_multilayer"):
        for condition in conditions:
            drops = [(s["arms"][projector].get("use") or {}).get(condition, {}).get("drop") for s in seeds]
            if all(d is None for d in drops):
                continue
            lines.append(f"| {SHORT[projector]} | {condition.replace('tap', 'tap ')} | "
                         f"{_ms(stats.summary(drops), 2)} | {', '.join(_fmt(d, 2) for d in drops if d is not None)} |")
    return lines


def damage_table(seeds) -> list:
    """The damage probe per tower and tapped layer: the pretrained tower's score, each arm's change from it
    (mean ± std over the seeds that ran it, then per seed). Described, not tested."""
    rows = [s for s in seeds if s.get("damage_pretrained")]
    if not rows:
        return []
    lines = ["\n### Mechanism: damage to the shallow blocks' features (linear probes on frozen features; "
             "described)\n", "| layer | metric | pretrained tower | " + " | ".join(
                 f"{SHORT[p]} − pretrained" for p in ARMS) + " | detached − naive, per seed |",
             "|---|---|---|---|---|---|---|"]
    for layer in rows[0]["damage_pretrained"]:
        for metric, name in (("glyph_accuracy", "glyph accuracy"), ("pixel_r2", "pixel R²")):
            pretrained = stats.summary([s["damage_pretrained"][layer][metric] for s in rows])
            change = {p: [None if not s["arms"][p].get("damage") or not s["arms"][p]["damage"]["vs_pretrained"]
                          else s["arms"][p]["damage"]["vs_pretrained"][layer][metric] for s in rows] for p in ARMS}
            paired = [None if a is None or b is None else b - a
                      for a, b in zip(change["mlp_multilayer"], change["detached_mlp_multilayer"])]
            lines.append(f"| {layer} | {name} | {_ms(pretrained)} | "
                         + " | ".join(_ms(stats.summary(change[p])) for p in ARMS)
                         + f" | {', '.join(_fmt(d) for d in paired)} |")
    return lines


def figures(result: Dict, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    seeds = result["seeds"]
    # the paired differences with their t-intervals, the primary endpoint first (points of exact match)
    paired = result["summary"]["paired_detached_minus_naive"]
    rows = [(f"{NAMES[name]}{' (primary)' if name == 'exact_match' else ''}", paired[name]["mean"],
             paired[name]["ci"]) for name in ("exact_match", "char_accuracy") if paired[name]["mean"] is not None]
    rows += [(name.replace("_", " "), r["mean"], r["ci"]) for name, r in result["summary"]["paired_vs_single"].items()
             if r["mean"] is not None]
    if rows:
        files["paired"] = save_png(interval_plot(rows, "Paired differences (same seed): mean and 95 % "
                                                       "t-interval", "points"),
                                   os.path.join(out_dir, "study_paired.png"))
    def curves(arms, points) -> Dict:
        """``{"<arm> seed <n>": (xs, ys)}`` over seeds and ``arms``, where ``points`` gives an arm's curve or None."""
        out = {}
        for s in seeds:
            for projector in arms:
                xy = points(s["arms"][projector])
                if xy:
                    out[f"{SHORT[projector]} seed {s['seed']}"] = xy
        return out

    def shallow_trcov(arm):
        grad = arm.get("grad")
        w = [x for x in grad["windows"][grad["shallow_group"]]["trcov_ratio"] if x["value"] is not None] if grad else []
        return w and ([x["last_step"] for x in w], [x["value"] for x in w])

    multilayer = ("mlp_multilayer", "detached_mlp_multilayer")
    # stage-2 loss, one line per arm and seed
    series = curves(ARMS, lambda arm: arm.get("losses") and (list(range(1, len(arm["losses"]) + 1)), arm["losses"]))
    if series:
        files["losses"] = save_png(plot_curves(series, {}, "Stage-2 (joint) training loss per step",
                                               "optimizer step", "loss"), os.path.join(out_dir, "study_losses.png"))
    # applied tower gradient norm at measured steps
    series = curves(multilayer, lambda arm: arm.get("grad") and (arm["grad"]["measured_steps"],
                                                                 arm["grad"]["tower_grad_norm"]))
    if series:
        files["tower_grad_norm"] = save_png(plot_curves(series, {}, "Gradient norm applied to the whole tower "
                                                                    "(measured steps)", "optimizer step", "norm"),
                                            os.path.join(out_dir, "study_tower_grad_norm.png"))
    # tr(Cov) ratio on the shallowest group over training windows
    series = curves(multilayer, shallow_trcov)
    if series:
        files["trcov_ratio"] = save_png(plot_curves(series, {"ratio 1": 1.0},
                                                    "tr(Cov skip) / tr(Cov main), shallowest block group, per window "
                                                    "(detached: counterfactual skip part)", "window's last step",
                                                    "ratio"), os.path.join(out_dir, "study_trcov_ratio.png"))
    # R-Probe held-out MSE vs probe step; the reference lines of the first seed that has them
    series = curves(ARMS, lambda arm: arm.get("rprobe") and ([h["step"] for h in arm["rprobe"]["history"]],
                                                             [h["mse"] for h in arm["rprobe"]["history"]]))
    hlines = next(({"threshold": s["rprobe"]["threshold"], "mean image": s["rprobe"]["trivial_mse"]}
                   for s in seeds if "rprobe" in s), {})
    if series:
        files["rprobe"] = save_png(plot_curves(series, hlines, "R-Probe held-out pixel MSE", "probe step", "MSE"),
                                   os.path.join(out_dir, "study_rprobe.png"))
    return files


def write(output_dir: str, quiet: bool = False) -> Dict:
    plan = _plan(output_dir)
    paths = load_json(os.path.join(output_dir, "paths.json")) or {}
    seeds = [collect_seed(output_dir, plan, seed, paths) for seed in plan.seeds]
    summary = summarise(seeds, plan)
    units_dir = os.path.join(output_dir, "units")
    units = {}
    if os.path.isdir(units_dir):
        for name in sorted(os.listdir(units_dir)):
            with open(os.path.join(units_dir, name), encoding="utf-8") as f:
                record = json.load(f)
            units[record["name"]] = {"seconds": record["seconds"], "finished": record["finished"],
                                     "command": record["argv"]}
    wall = load_json(os.path.join(output_dir, "wall_seconds.json"))
    assets = {}
    for key in ("tower_report", "lm_report"):
        report = load_json(paths[key]) if paths.get(key) else None
        if report is not None:
            assets[key] = {k: report.get(k) for k in ("settings", "char_accuracy", "string_accuracy",
                                                      "heldout_perplexity", "heldout_head", "key", "build_seconds")}
    search = load_json(os.path.join(output_dir, "search", "search.json"))
    result = {
        "regime_search": search,
        "what": "llava-dsl study: single layer vs naive multi-layer vs Detached Skip-Links on locally pretrained "
                "tiny parts reading rendered digit strings, per seed, through the package's entry points",
        "plan": plan.to_json(), "assets": assets,
        "rules": {"spike": {"window": stats.SPIKE_WINDOW, "robust_z": stats.SPIKE_ROBUST_Z,
                            "min_relative": stats.SPIKE_MIN_RELATIVE},
                  "alpha": stats.ALPHA, "power": stats.POWER,
                  "verdicts": __import__("llava_dsl.study.analysis", fromlist=["x"]).__doc__.split("\n\n")[1]},
        "seeds": seeds, "summary": summary, "units": units, "wall": wall,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_now": list(os.getloadavg())},
    }
    # the per-step loss series stay in the JSON; the markdown gets the tables
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(result, indent=1))
    markdown = tables(result)
    atomic_write_text(os.path.join(output_dir, "results.md"), markdown)
    result["figures"] = figures(result, os.path.join(output_dir, "figures"))
    if not quiet:
        print(markdown)
    return result


def reanalyse(results_file: str) -> str:
    """The tables of a committed results.json under the current rules (its seeds' numbers as recorded; a run
    that kept no per-question outcomes has no CMH test, and its primary verdict stays inconclusive)."""
    with open(results_file, encoding="utf-8") as f:
        result = json.load(f)
    result["summary"] = summarise(result["seeds"], plan_from_json(result["plan"]))
    return tables(result)
