"""Reads what the units wrote (trainer states, ``dsl_grad_stats.json``, scored answers, R-Probe reports) into
per-seed numbers, summaries and paired differences, and applies the analysis declared before the runs.

Primary endpoint: held-out exact match, detached - naive, paired by seed. "reproduces" when the paired t over
seeds and the Cochran-Mantel-Haenszel test on per-question outcomes stratified by seed both reject at alpha 0.05
(two-sided) with detached better, "contradicts" when both reject with detached worse, "inconclusive" otherwise,
always with the t-interval and the smallest effect the run could have detected at 80 % power. Secondary metrics
(character accuracy, exact match on handwritten digits, final loss, spikes, tower gradient norm, R-Probe): a
paired t each, Holm-corrected over the secondary family, labelled secondary; they decide no claim. Gradient
statistics and the damage probe describe one model at a time: they are described (on the paper's side in k of
n seeds), never judged.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence

from llava_dsl.study import stats
from llava_dsl.study.plan import ARMS, SHORT, Plan
from llava_dsl.study.runner import damage_file, eval_dir, fixed_dir, load_json, stage_dir, use_dir

GRAD_KEYS = ("trcov_ratio", "cos_mean", "snr_main", "snr_full", "trcov_main", "trcov_skip", "norm_main", "norm_skip")

# cos(g_main, g_skip) counts as "about 0" (the paper's orthogonality) below this
COS_NEAR_ZERO = 0.2


def stage2_losses(folder: str) -> Optional[List[float]]:
    state = load_json(os.path.join(folder, "trainer_state.json"))
    if state is None:
        return None
    return [float(e["loss"]) for e in state["log_history"] if "loss" in e]


def normalise_answer(text: Optional[str]) -> str:
    """Lower case, spaces and a trailing full stop removed: '1234.' and ' 1234' are both '1234'."""
    text = (text or "").strip().lower()
    text = re.sub(r"\s+", "", text)
    return text[:-1] if text.endswith(".") else text


def char_accuracy(predicted: str, truth: str) -> float:
    """Share of positions read right; a longer or shorter answer counts the extra or missing positions wrong."""
    if not truth and not predicted:
        return 1.0
    hits = sum(1 for a, b in zip(predicted, truth) if a == b)
    return hits / max(len(truth), len(predicted))


def _scored_rows(scored_file: str) -> List[Dict]:
    with open(scored_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        row["truth"] = normalise_answer(row["ground_truth"][0] if isinstance(row["ground_truth"], list)
                                        else row["ground_truth"])
        row["answer"] = normalise_answer(row["prediction"])
    return rows


def question_outcomes(scored_file: str) -> Optional[Dict[str, bool]]:
    """Question id -> exact match, from one arm's scored.jsonl (the primary test's per-question outcomes)."""
    if not os.path.isfile(scored_file):
        return None
    return {str(row["question_id"]): row["answer"] == row["truth"] for row in _scored_rows(scored_file)}


def answer_scores(scored_file: str) -> Optional[Dict]:
    if not os.path.isfile(scored_file):
        return None
    rows = _scored_rows(scored_file)
    exact = sum(row["answer"] == row["truth"] for row in rows)
    chars = sum(char_accuracy(row["answer"], row["truth"]) for row in rows)
    n = len(rows)
    low, high = stats.wilson(exact, n)
    return {"exact_match": 100.0 * exact / n, "exact_match_wilson95": [100.0 * low, 100.0 * high],
            "char_accuracy": 100.0 * chars / n, "n": n, "scored_file": scored_file,
            "distinct_answers": len({row["answer"] for row in rows}),
            "examples": [{"prediction": row["prediction"], "truth": row["truth"]} for row in rows[:6]]}


def find_scored(folder: str) -> str:
    """The scored.jsonl the evaluation runner wrote under ``folder`` (it adds the benchmark's subfolder)."""
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f == "scored.jsonl")
    return found[0] if found else os.path.join(folder, "textvqa", "scored.jsonl")


def tower_grad_norms(grad: Dict) -> List[float]:
    """The gradient norm the run applied to the whole tower at each measured step (sqrt of the groups' sum)."""
    return [math.sqrt(sum(g["norm_applied"] ** 2 for g in step["groups"].values())) for step in grad["steps"]]


def shallow_group(grad: Dict) -> str:
    """The shallowest group of tower blocks (the first after the embeddings): the paper's claim is about it."""
    names = [g["name"] for g in grad["groups"]]
    blocks = [n for n in names if n != "embeddings"]
    return blocks[0] if blocks else names[0]


def skip_groups(grad: Dict) -> List[str]:
    """Groups that some tap reaches (so g_skip exists)."""
    taps = grad["layer_spec"]["taps"]
    return [g["name"] for g in grad["groups"] if any(t >= g["blocks"][1] for t in taps)]


def window_series(grad: Dict, group: str, key: str) -> List[Dict]:
    return [{"first_step": w["first_step"], "last_step": w["last_step"], "value": w["groups"][group].get(key)}
            for w in grad["windows"] if group in w["groups"]]


def _fixed(output_dir: str, seed: int, point: str, projector: str) -> Optional[Dict]:
    grad = load_json(os.path.join(fixed_dir(output_dir, seed, point, projector), "dsl_grad_stats.json"))
    if grad is None or not grad["windows"]:
        return None
    window = grad["windows"][-1]
    return {"num_steps": window["num_steps"], "partial": window["partial"],
            # every key the splitter wrote: GRAD_KEYS, and per tap "tap<L>/..." and "snr_if_detach_depth_<D>"
            "groups": {name: dict(v) for name, v in window["groups"].items()},
            "shallow_group": shallow_group(grad), "skip_groups": skip_groups(grad)}


def _tensors(source: str, prefix: str = "") -> Dict:
    import torch
    from safetensors.torch import load_file

    files = [source] if os.path.isfile(source) else [os.path.join(source, n) for n in sorted(os.listdir(source))]
    out = {}
    for path in files:
        name = os.path.basename(path)
        if name.endswith(".safetensors"):
            out.update(load_file(path))
        elif name.endswith(".bin") and (name.startswith("pytorch_model") or name == "mm_projector.bin"):
            out.update(torch.load(path, map_location="cpu", weights_only=True))
    return {prefix + k: v for k, v in out.items()}


def weights_unchanged(before, after: str) -> Optional[Dict]:
    """Max |difference| between the tensors of the saved model ``after`` and ``before`` (a folder or file, or a
    list of (folder or file, key prefix) pairs that together make the model) on the keys they share: 0
    everywhere proves theta did not move."""
    sources = [(before, "")] if isinstance(before, str) else list(before)
    if not os.path.isdir(after) or not all(os.path.exists(s) for s, _ in sources):
        return None
    a = {}
    for source, prefix in sources:
        a.update(_tensors(source, prefix))
    b = _tensors(after)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diff = max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in common)
    tower = [k for k in common if "vision_tower" in k]
    return {"tensors_compared": len(common), "tower_tensors": len(tower), "only_before": len(set(a) - set(b)),
            "only_after": len(set(b) - set(a)), "max_abs_difference": diff}


def collect_seed(output_dir: str, plan: Plan, seed: int, paths: Dict[str, str]) -> Dict:
    """Everything measured for one seed; a missing piece is None (never dropped)."""
    arms = {}
    probe = load_json(os.path.join(output_dir, "rprobe", f"seed{seed}", "report.json"))
    probe_by_path = {}
    if probe is not None:
        probe_by_path = {os.path.abspath(c["checkpoint"]): c for c in probe["checkpoints"]}
    for projector in ARMS:
        folder = stage_dir(output_dir, seed, projector, 2)
        losses = stage2_losses(folder)
        row = {"stage2_dir": folder, "losses": losses}
        if losses:
            tail = losses[-max(1, len(losses) // 10):]
            spikes = stats.loss_spikes(losses)
            row.update(first_loss=losses[0], final_loss=sum(tail) / len(tail), spikes=len(spikes),
                       spike_steps=[i + 1 for i in spikes], max_loss_after_warmup=max(losses[stats.SPIKE_WINDOW:])
                       if len(losses) > stats.SPIKE_WINDOW else None)
        if paths.get("vision_tower") and os.path.isfile(os.path.join(folder, "config.json")):
            # how far joint training moved the tower: > 0 shows the tower trained (and that the fixed-theta
            # check below compares trained weights, not the pretrained ones)
            moved = weights_unchanged([(paths["vision_tower"], "model.vision_tower.vision_tower.")], folder)
            row["tower_change_from_pretrained"] = moved
        grad = load_json(os.path.join(folder, "dsl_grad_stats.json"))
        if grad is not None:
            norms = tower_grad_norms(grad)
            group = shallow_group(grad)
            row["grad"] = {
                "shallow_group": group, "skip_groups": skip_groups(grad),
                "measured_steps": [s["step"] for s in grad["steps"]], "tower_grad_norm": norms,
                "tower_grad_norm_max": max(norms) if norms else None,
                "tower_grad_norm_cv": stats.coefficient_of_variation(norms),
                "windows": {g: {k: window_series(grad, g, k) for k in GRAD_KEYS} for g in skip_groups(grad)},
                "shallow_norm_applied": [s["groups"][group]["norm_applied"] for s in grad["steps"]],
                "shallow_norm_main": [s["groups"][group]["norm_main"] for s in grad["steps"]],
                "shallow_norm_skip": [s["groups"][group]["norm_skip"] for s in grad["steps"]],
                "timing": grad.get("timing"),
            }
        for heldout, key in (("rendered", "answers"), ("handwritten", "answers_handwritten")):
            row[key] = answer_scores(find_scored(eval_dir(output_dir, seed, projector, heldout)))
        use = load_json(os.path.join(use_dir(output_dir, seed, projector), "use.json"))
        if use is not None:  # exact-match drop (points) with each tap, and all taps, replaced by its training mean
            row["use"] = {name: {"drop": 100.0 * c["drop"], "lost": c["lost"], "gained": c["gained"], "n": c["n"]}
                          for name, c in use["conditions"].items() if name != "none"}
        result = probe_by_path.get(os.path.abspath(folder))
        if result is not None:
            row["rprobe"] = {"steps_to_threshold": result["steps_to_threshold"], "final_mse": result["final"]["mse"],
                             "final_psnr": result["final"]["psnr"],
                             "history": [{"step": h["step"], "mse": h["mse"]} for h in result["history"]]}
        arms[projector] = row
    outcomes = [arms[p]["answers"] and question_outcomes(arms[p]["answers"]["scored_file"])
                for p in ("mlp_multilayer", "detached_mlp_multilayer")]
    # the primary test's data: b questions only naive read, c only detached read, on the seed's held-out sample
    discordant = stats.discordant_counts(*outcomes, where=f"seed {seed}") if all(outcomes) else None
    fixed = {}
    for point in plan.fixed_theta_points:
        for projector in (("mlp_multilayer",) if point == "start" else ("mlp_multilayer", "detached_mlp_multilayer")):
            key = "start" if point == "start" else f"{point}-{SHORT[projector]}"
            fixed[key] = _fixed(output_dir, seed, point, projector)
            if fixed[key] is None:
                continue
            if point == "start":  # the LLM, the pretrained tower and the stage-1 adapter
                source = [(paths["llm"], ""), (paths["vision_tower"], "model.vision_tower.vision_tower."),
                          (os.path.join(stage_dir(output_dir, seed, "mlp_multilayer", 1), "mm_projector.bin"), "")]
            else:
                source = stage_dir(output_dir, seed, projector, 2)
                if point == "mid":
                    source = os.path.join(source, f"checkpoint-{plan.mid_step}")
            fixed[key]["theta_check"] = weights_unchanged(source, fixed_dir(output_dir, seed, point, projector))
    damage = load_json(damage_file(output_dir, seed))
    if damage is not None:
        by_path = {os.path.abspath(k): v for k, v in damage["checkpoints"].items()}
        for projector in ARMS:
            entry = by_path.get(os.path.abspath(stage_dir(output_dir, seed, projector, 2)))
            if entry is not None:
                arms[projector]["damage"] = {"layers": entry["layers"], "vs_pretrained": entry.get("vs_reference")}
    out = {"seed": seed, "arms": arms, "fixed_theta": fixed,
           "damage_pretrained": None if damage is None or not damage.get("reference") else
           damage["reference"]["layers"],
           "discordant_naive_detached": None if discordant is None else {"b": discordant[0], "c": discordant[1]}}
    if probe is not None:
        out["rprobe"] = {"threshold": probe["threshold"]["mse"], "trivial_mse": probe["trivial"]["mse"],
                         "threshold_source": probe["threshold"].get("source")}
    return out


def _value(seed_row: Dict, projector: str, path: Sequence[str]):
    node = seed_row["arms"].get(projector)
    for key in path:
        if node is None:
            return None
        node = node.get(key)
    return node


PRIMARY = "exact_match"

METRICS = {
    # name: (path in an arm's row, the paper's better direction: -1 lower is better, +1 higher is better);
    # every one but PRIMARY is secondary
    "exact_match": (("answers", "exact_match"), +1),
    "char_accuracy": (("answers", "char_accuracy"), +1),
    "handwritten_exact_match": (("answers_handwritten", "exact_match"), +1),
    "final_loss": (("final_loss",), -1),
    "spikes": (("spikes",), -1),
    "tower_grad_norm_max": (("grad", "tower_grad_norm_max"), -1),
    "tower_grad_norm_cv": (("grad", "tower_grad_norm_cv"), -1),
    "rprobe_steps_to_threshold": (("rprobe", "steps_to_threshold"), -1),
    "rprobe_final_mse": (("rprobe", "final_mse"), -1),
}


def describe_sides(values: Sequence[Optional[float]], paper_side) -> str:
    present = [v for v in values if v is not None]
    return f"paper's side in {sum(1 for v in present if paper_side(v))} of {len(present)} seeds"


def secondary_reading(result: Dict, better: int, adjusted_p: Optional[float]) -> str:
    if adjusted_p is None or result.get("mean") is None:
        return "no data"
    if adjusted_p >= stats.ALPHA:
        return "no difference shown"
    return "detached better" if result["mean"] * better > 0 else "detached worse"


def summarise(seeds: List[Dict], plan: Plan) -> Dict:
    per_arm = {}
    for projector in ARMS:
        per_arm[projector] = {name: stats.summary([_value(s, projector, path) for s in seeds])
                              for name, (path, _) in METRICS.items()}
    # R-Probe: a probe that never reaches the threshold is counted at (steps + eval_every), marked censored
    def probe_steps(s, projector):
        row = _value(s, projector, ("rprobe",))
        if row is None:
            return None
        return row["steps_to_threshold"] if row["steps_to_threshold"] is not None else \
            plan.probe_steps + plan.probe_eval_every
    paired = {}
    for name, (path, better) in METRICS.items():
        if name == "rprobe_steps_to_threshold":
            naive = [probe_steps(s, "mlp_multilayer") for s in seeds]
            detached = [probe_steps(s, "detached_mlp_multilayer") for s in seeds]
        else:
            naive = [_value(s, "mlp_multilayer", path) for s in seeds]
            detached = [_value(s, "detached_mlp_multilayer", path) for s in seeds]
        result = stats.paired_t([None if a is None or b is None else b - a for a, b in zip(naive, detached)])
        result["better"] = "higher" if better > 0 else "lower"
        paired[name] = result
    strata = [(s["discordant_naive_detached"]["b"], s["discordant_naive_detached"]["c"]) for s in seeds
              if s.get("discordant_naive_detached")]
    cmh = stats.cmh_paired(strata) if strata else None
    primary = {**paired[PRIMARY], "cmh": cmh, "verdict": stats.primary_verdict(paired[PRIMARY], cmh),
               "alpha": stats.ALPHA}
    adjusted = stats.holm({name: r["p"] for name, r in paired.items() if name != PRIMARY})
    for name, result in paired.items():
        if name != PRIMARY:
            result["p_holm"] = adjusted[name]
            result["reading"] = "secondary: " + secondary_reading(result, METRICS[name][1], adjusted[name])
    against_single = {}
    for name in ("exact_match", "char_accuracy"):
        path = METRICS[name][0]
        single = [_value(s, "mlp2x_gelu", path) for s in seeds]
        for projector in ("mlp_multilayer", "detached_mlp_multilayer"):
            other = [_value(s, projector, path) for s in seeds]
            # only the seeds the single layer ran on (plan.single_seeds)
            against_single[f"{name}: {SHORT[projector]} - single"] = stats.paired_t(
                [b - a for a, b in zip(single, other) if a is not None and b is not None])
    adjusted = stats.holm({k: r["p"] for k, r in against_single.items()})
    for name, result in against_single.items():
        result["p_holm"] = adjusted[name]

    # claim (a), at fixed theta, on the shallowest block group and on every group a tap reaches
    gradient = {}
    points = [k for s in seeds for k in s["fixed_theta"]]
    for key in dict.fromkeys(points):
        rows = [s["fixed_theta"].get(key) for s in seeds]
        groups = next((r["skip_groups"] for r in rows if r), [])
        shallow = next((r["shallow_group"] for r in rows if r), None)
        entry = {"shallow_group": shallow, "groups": {}}
        for group in groups:
            keys = dict.fromkeys(k for r in rows if r for k in r["groups"].get(group, {}))
            values = {k: [None if r is None else r["groups"].get(group, {}).get(k) for r in rows]
                      for k in dict.fromkeys(list(GRAD_KEYS) + list(keys))}
            snr_gain = [None if a is None or b is None else a - b
                        for a, b in zip(values["snr_main"], values["snr_full"])]
            # the SNR gain of exactly what the detached arm does: drop its plan.detach_depth shallowest taps
            kept = values.get(f"snr_if_detach_depth_{plan.detach_depth}", [None] * len(rows))
            snr_gain_detached = [None if a is None or b is None else a - b for a, b in zip(kept, values["snr_full"])]
            entry["groups"][group] = {
                **{k: stats.summary(v) for k, v in values.items()},
                "snr_gain_without_skip": stats.summary(snr_gain),
                "snr_gain_if_detached": stats.summary(snr_gain_detached),
                "snr_rises_if_detached": describe_sides(snr_gain_detached, lambda v: v > 0),
                "ratio_above_1": describe_sides(values["trcov_ratio"], lambda v: v > 1),
                "cos_near_0": describe_sides(values["cos_mean"], lambda v: abs(v) < COS_NEAR_ZERO),
                "snr_rises_without_skip": describe_sides(snr_gain, lambda v: v > 0),
            }
        entry["theta_checks"] = [None if r is None else r.get("theta_check") for r in rows]
        gradient[key] = entry
    return {"primary": primary, "per_arm": per_arm, "paired_detached_minus_naive": paired,
            "paired_vs_single": against_single, "fixed_theta": gradient}
