#!/usr/bin/env python
"""The GPU suite: LLaVA-1.5-7B-shaped costs on one GPU in one command, one JSON and one Markdown file.

    bash scripts/bench/gpu_suite.sh                 # on the GPU machine (builds or reuses its environment first)
    python scripts/bench/gpu_suite.py --dry-run     # CPU, tiny shapes, the same code paths

Parts, each in its own process group with its own time budget (a part that fails, or runs out of time, is named in
the results and the suite goes on; time a part leaves unused goes to the parts after it):

  rprobe     one R-Probe step vs one full-LLM forward + backward on the same 576 visual tokens at 7B widths
             (bench_rprobe.py). Target: <= 0.35x.
  dpvr       DPVR-LF at LLaVA-1.5-7B widths (32 layers x 4096): prefill latency and KV cache, stock vs R = 18,
             576 image tokens (bench_dpvr.py --device cuda --dtype bfloat16). Target: >= 25 % lower prefill latency.
  gpu_tests  pytest -m gpu -s tests/gpu/test_gpu.py (bf16 ZeRO-3 joint run, flash-attention if importable, SDPA,
             4-bit QLoRA beside a trainable tower), output captured.
  joint      joint stage 2 at 7B widths through scripts/zero3/finetune.sh under ZeRO-3 (train_throughput.py's
             run_scripts + step_timer): CLIP-L/14-336-shaped tower (24 blocks, width 1024, 16 heads, MLP 4096,
             577 tokens), LLaMA-7B widths (4096, MLP 11008, 32 heads) at a cut depth, bf16, gradient checkpointing,
             SDPA, random weights; mlp2x_gelu and detached_mlp_multilayer alternating at two depths (A B at the
             first, B A at the second), so per-layer figures and the extrapolation to 32 layers come from the
             difference. Target: detached / stock throughput >= 0.98.

--dry-run: tiny shapes, fp32 on the CPU, the same code paths; the GPU-only tests skip themselves and are reported as
skipped with the reason. Work files (model weights: GBs at 7B widths) go to --work, never under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
PYTHON = sys.executable
PARTS = ("rprobe", "dpvr", "gpu_tests", "joint")
TITLES = {"joint": "1. Joint stage 2 at 7B shapes (ZeRO-3, finetune.sh)", "gpu_tests": "2. pytest -m gpu",
          "rprobe": "3. R-Probe cost", "dpvr": "4. DPVR-LF at 7B widths"}
# seconds per part on the GPU (the suite's target is under ~9 minutes including the environment)
GPU_BUDGETS = {"rprobe": 50, "dpvr": 60, "gpu_tests": 110, "joint": 260}
DRY_BUDGETS = {"rprobe": 120, "dpvr": 120, "gpu_tests": 120, "joint": 600}
# dense bf16 peak of the SXM parts (vendor datasheets); MFU is left out on other devices unless --peak-tflops is given
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "A800": 312.0}
STOCK, DETACHED = "mlp2x_gelu", "detached_mlp_multilayer"

# Shapes. GPU: the issue's. Tiny: the same structure, small enough for a shared 2-core CPU.
JOINT_GPU = dict(vision_hidden=1024, vision_layers=24, vision_intermediate=4096, vision_heads=16, patch_size=14,
                 image_size=336, llm_hidden=4096, llm_intermediate=11008, llm_heads=32, depths=(8, 4), batch=16,
                 samples=64, model_max_length=2048, steps=12, warmup=3, profile=(10, 2))
JOINT_TINY = dict(vision_hidden=32, vision_layers=4, vision_intermediate=64, vision_heads=2, patch_size=14,
                  image_size=56, llm_hidden=64, llm_intermediate=172, llm_heads=2, depths=(2, 1), batch=2,
                  samples=8, model_max_length=2048, steps=4, warmup=1, profile=(3, 1))
FULL_DEPTH = 32


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_group(command: List[str], log: Path, timeout: float, env: Optional[dict] = None) -> dict:
    """Run ``command`` in its own session, output to ``log``; on timeout the whole process group is ended
    (the deepspeed launcher's ranks included). Returns rc, seconds and whether the budget ran out."""
    began = time.time()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env or os.environ.copy(),
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        try:  # ranks the launcher left behind in the same group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {"rc": rc, "seconds": round(time.time() - began, 1), "timed_out": timed_out}


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def machine_info() -> dict:
    info: Dict[str, object] = {"python": sys.version.split()[0], "executable": PYTHON}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = f"not available ({error.__class__.__name__})"
    probe = ("import json, importlib.util as u, torch, transformers, platform\n"
             "d = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'cuda': torch.cuda.is_available(),\n"
             "     'transformers': transformers.__version__, 'cpu': platform.processor() or platform.machine()}\n"
             "if d['cuda']:\n"
             "    p = torch.cuda.get_device_properties(0)\n"
             "    d.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),\n"
             "             capability=f'{p.major}.{p.minor}')\n"
             "for m in ('deepspeed', 'flash_attn', 'bitsandbytes', 'peft', 'accelerate', 'llava'):\n"
             "    spec = u.find_spec(m)\n"
             "    d[m] = None\n"
             "    if spec is not None:\n"
             "        try:\n"
             "            d[m] = getattr(__import__(m), '__version__', 'importable')\n"
             "        except Exception as e:\n"
             "            d[m] = f'import fails: {e.__class__.__name__}: {e}'[:200]\n"
             "print(json.dumps(d))\n")
    try:
        out = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=180, cwd=ROOT)
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception as error:  # noqa: BLE001 - the suite reports what it could not read
        info["probe_error"] = f"{error.__class__.__name__}: {error}"
    flash = info.get("flash_attn")
    info["attention"] = {
        "joint": "sdpa (as the issue specifies)",
        "gpu_tests": ("flash_attention_2 and sdpa" if flash and not str(flash).startswith("import fails")
                      else "sdpa only (flash-attn not importable: its test skips itself)"),
        "rprobe / dpvr": "sdpa (the probe passes an explicit mask; DPVR-LF's routed forward uses SDPA)",
    }
    return info


def peak_flops(device_name: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override * 1e12
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def verdict(value: Optional[float], target: float, at_least: bool, dry: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    text = "met" if met else "not met"
    return f"dry run: {text}" if dry else text


# ------------------------------------------------------------------------------------------------------------------
# part 1: joint stage 2 (runs as a child: python gpu_suite.py --part-child joint ...)
# ------------------------------------------------------------------------------------------------------------------
def truncate_llm(src: str, dst: str, layers: int) -> str:
    """A copy of the random LLM with only its first ``layers`` decoder layers (same widths, same weights)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name.endswith(".safetensors"):
            keep = {}
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    parts = key.split(".")
                    if key.startswith("model.layers.") and int(parts[2]) >= layers:
                        continue
                    keep[key] = f.get_tensor(key)
            save_file(keep, os.path.join(dst, name), metadata={"format": "pt"})
        elif name == "config.json":
            config = json.load(open(path))
            config["num_hidden_layers"] = layers
            json.dump(config, open(os.path.join(dst, name), "w"), indent=1)
        elif name.endswith(".safetensors.index.json"):
            index = json.load(open(path))
            index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                                   if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)}
            json.dump(index, open(os.path.join(dst, name), "w"), indent=1)
        elif os.path.isfile(path):
            shutil.copy(path, dst)
    return dst


def write_adapter(path: str, projector: str, shape: dict) -> None:
    """A stage-1 ``mm_projector.bin`` of the right shape for ``projector`` (random; what pretrain.sh would write,
    without a launch per type). The multilayer width comes from the plugin's own layer resolution."""
    import torch

    from llava_dsl import build_multilayer_mlp, resolve_layer_spec

    inputs = 1
    if projector != STOCK:
        inputs = len(resolve_layer_spec(shape["vision_layers"], -2).concat_order)
    torch.manual_seed(0)
    mlp = build_multilayer_mlp(shape["vision_hidden"], inputs, shape["llm_hidden"], 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()}, path)


def sequence_lengths(data_path: str, llm_path: str, image_tokens: int, max_length: int) -> List[int]:
    """Tokens per sample as the LLM sees them: LLaVA's v1 conversation, its <image> handling, 576 image features."""
    import llava_dsl
    from transformers import AutoTokenizer

    llava_dsl.register()
    from llava import conversation as conversation_lib
    from llava.mm_utils import tokenizer_image_token

    tokenizer = AutoTokenizer.from_pretrained(llm_path, use_fast=False)
    lengths = []
    for record in json.load(open(data_path)):
        conv = conversation_lib.conv_templates["v1"].copy()
        conv.messages = []
        roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
        for turn in record["conversations"]:
            value = turn["value"]
            if "<image>" in value:
                value = "<image>\n" + value.replace("<image>", "").strip()
            conv.append_message(roles[turn["from"]], value)
        ids = tokenizer_image_token(conv.get_prompt(), tokenizer)
        lengths.append(min(len(ids) - 1 + image_tokens, max_length))
    return lengths


def joint_flops(shape: dict, depth: int, projector: str, lengths: List[int], vocab: int) -> Dict[str, float]:
    """Model FLOPs of one optimizer step (6 per parameter per token, plus attention), recomputation not counted.

    LLM:   6 T (L (4 d^2 + 3 d f) + d V) + 12 L d B E[s^2]       T = B E[s] tokens, s = sequence length
    tower: 6 B n_v (L_v (4 d_v^2 + 2 d_v f_v) + 3 p^2 d_v) + 12 L_v d_v B n_v^2    n_v tokens (577), L_v blocks run
    projector: 6 B n_img (c d_v d + d^2)                          c = feature maps concatenated (1 or 4)
    """
    from llava_dsl import resolve_layer_spec

    b, d, f = shape["batch"], shape["llm_hidden"], shape["llm_intermediate"]
    mean_s = statistics.mean(lengths)
    mean_s2 = statistics.mean(s * s for s in lengths)
    tokens = b * mean_s
    per_layer = 6 * tokens * (4 * d * d + 3 * d * f) + 12 * d * b * mean_s2
    head = 6 * tokens * d * vocab
    grid = shape["image_size"] // shape["patch_size"]
    n_v, dv, fv, p = grid * grid + 1, shape["vision_hidden"], shape["vision_intermediate"], shape["patch_size"]
    spec = resolve_layer_spec(shape["vision_layers"], -2)
    blocks = spec.main  # blocks 1..main run (nothing past the main layer)
    tower = 6 * b * n_v * (blocks * (4 * dv * dv + 2 * dv * fv) + 3 * p * p * dv) + 12 * blocks * dv * b * n_v ** 2
    maps = 1 if projector == STOCK else len(spec.concat_order)
    projector_flops = 6 * b * grid * grid * (maps * dv * d + d * d)
    return {"per_llm_layer": per_layer, "llm_head": head, "tower": tower, "projector": projector_flops,
            "total": depth * per_layer + head + tower + projector_flops, "tokens_per_step": tokens,
            "mean_sequence": mean_s}


def part_joint(args, out_json: Path, deadline: float) -> None:
    sys.path.insert(0, str(BENCH))
    import train_throughput as tt

    shape = dict(JOINT_TINY if args.dry_run else JOINT_GPU)
    if args.joint_depths:
        shape["depths"] = tuple(int(x) for x in args.joint_depths.split(","))
    start, count = shape["profile"]
    flags = ["--out", str(out_json.with_suffix(".unused.json")), "--steps", str(shape["steps"]),
             "--warmup", str(shape["warmup"]), "--profile", f"{start},{count}", "--batch", str(shape["batch"]),
             "--samples", str(shape["samples"]), "--image-size", str(shape["image_size"]),
             "--vision-hidden", str(shape["vision_hidden"]), "--vision-layers", str(shape["vision_layers"]),
             "--vision-intermediate", str(shape["vision_intermediate"]), "--vision-heads", str(shape["vision_heads"]),
             "--patch-size", str(shape["patch_size"]), "--llm-hidden", str(shape["llm_hidden"]),
             "--llm-layers", str(max(shape["depths"])), "--llm-intermediate", str(shape["llm_intermediate"]),
             "--llm-heads", str(shape["llm_heads"]), "--model-max-length", str(shape["model_max_length"]),
             "--attn-implementation", "sdpa", "--num-gpus", "1", "--master-port", str(args.master_port),
             "--types", f"{STOCK},{DETACHED}", "--via-scripts", "--gradient-checkpointing",
             "--train-module", "suite_timer"]
    if not args.dry_run:
        flags.append("--bf16")
    targs = tt.build_parser().parse_args(flags)
    result = {"shape": shape, "dtype": "fp32 (CPU)" if args.dry_run else "bf16", "runs": [], "skipped_runs": [],
              "failed_runs": [], "notes": []}

    def save():
        write_json(out_json, result)

    work = Path(args.work) / "joint"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    began = time.time()
    assets = tt.build_assets(str(work / "assets"), targs)
    llms = {max(shape["depths"]): assets["llm"]}
    for depth in shape["depths"]:
        if depth not in llms:
            llms[depth] = truncate_llm(assets["llm"], str(work / "assets" / f"llm-{depth}"), depth)
    image_tokens = (shape["image_size"] // shape["patch_size"]) ** 2
    lengths = sequence_lengths(assets["finetune"], assets["llm"], image_tokens, shape["model_max_length"])
    vocab = json.load(open(os.path.join(assets["llm"], "config.json")))["vocab_size"]
    result["assets_s"] = round(time.time() - began, 1)
    result["sequence"] = {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths),
                          "image_tokens": image_tokens, "vocab": vocab}
    result["flops"] = {f"{p}@{d}": joint_flops(shape, d, p, lengths, vocab) for d in shape["depths"] + (FULL_DEPTH,)
                       for p in (STOCK, DETACHED)}
    result["flops_formula"] = joint_flops.__doc__
    save()

    first, second = shape["depths"][0], shape["depths"][1] if len(shape["depths"]) > 1 else None
    plan = [(first, STOCK), (first, DETACHED)]
    if second is not None:
        plan += [(second, DETACHED), (second, STOCK)]
    longest = 0.0
    for depth, projector in plan:
        remaining = deadline - time.time()
        if longest and remaining < 1.15 * longest + 5:
            result["skipped_runs"].append({"depth": depth, "projector": projector,
                                           "why": f"would not fit: {remaining:.0f} s left, the longest run took "
                                                  f"{longest:.0f} s"})
            save()
            continue
        run_dir = work / "runs" / f"d{depth}"
        out = run_dir / f"llava-{projector}"
        write_adapter(str(run_dir / f"llava-{projector}-pretrain" / "mm_projector.bin"), projector, shape)
        timer_out = run_dir / f"steps-{projector}.json"
        t0 = time.time()
        try:
            tt.run_scripts({**assets, "llm": llms[depth]}, projector, shape["steps"], str(out), targs,
                           str(timer_out), profile=f"{start},{count}")
        except SystemExit as error:
            result["failed_runs"].append({"depth": depth, "projector": projector, "seconds": round(time.time() - t0, 1),
                                          "error": str(error)[-3000:]})
            save()
            continue
        seconds = time.time() - t0
        longest = max(longest, seconds)
        timed = json.load(open(timer_out))
        steps = timed["step_s"][shape["warmup"]:start]
        profile_src = timer_out.with_suffix(".profile.txt")
        profile_dst = out_json.parent / f"joint_d{depth}_{projector}.profile.txt"
        if profile_src.exists():
            shutil.copy(profile_src, profile_dst)
        result["runs"].append({
            "depth": depth, "projector": projector, "launch_to_exit_s": round(seconds, 1),
            "median_step_s": statistics.median(steps), "timed_steps": len(steps),
            "step_s": timed["step_s"], "median_between_s": statistics.median(timed["between_s"][shape["warmup"]:start]),
            "kernel_s_per_step": timed.get("profiled_device_s_per_step") or None,  # 0 on a CPU: no device events
            "host_s_per_step_profiled": timed.get("profiled_host_s_per_step"),
            "memory": timed.get("memory", {}), "profile_table": profile_dst.name if profile_src.exists() else None,
        })
        save()
    result["done"] = True
    save()


def summarise_joint(data: dict, device: str, peak: Optional[float], dry: bool) -> dict:
    """Per depth and type; per LLM layer from two depths of the same type (else FLOPs-scaled, and said so)."""
    runs = {(r["depth"], r["projector"]): r for r in data.get("runs", [])}
    summary = {"per_depth": {}, "per_layer": {}, "extrapolated_32": {}}
    for d in data["shape"]["depths"]:
        row = {}
        for p in (STOCK, DETACHED):
            if (d, p) not in runs:
                continue
            r, flops = runs[(d, p)], data["flops"][f"{p}@{d}"]
            row[p] = {"median_step_s": r["median_step_s"], "kernel_s_per_step": r["kernel_s_per_step"],
                      "peak_allocated_gib": r["memory"].get("max_allocated_gib"),
                      "tokens_per_s": flops["tokens_per_step"] / r["median_step_s"],
                      "model_tflops_per_step": flops["total"] / 1e12,
                      "mfu": flops["total"] / r["median_step_s"] / peak if peak else None}
        if not row:
            continue
        if STOCK in row and DETACHED in row:
            row["throughput_ratio"] = row[STOCK]["median_step_s"] / row[DETACHED]["median_step_s"]
            k_stock, k_det = row[STOCK]["kernel_s_per_step"], row[DETACHED]["kernel_s_per_step"]
            row["kernel_ratio"] = k_stock / k_det if k_stock and k_det else None
        summary["per_depth"][d] = row
    for p in (STOCK, DETACHED):
        ran = sorted(d for d in summary["per_depth"] if p in summary["per_depth"][d])
        flops = data["flops"][f"{p}@{FULL_DEPTH}"]
        if len(ran) >= 2:
            hi, lo = ran[-1], ran[0]
            a, b = summary["per_depth"][hi][p], summary["per_depth"][lo][p]
            per = {key: (a[key] - b[key]) / (hi - lo) for key in ("median_step_s", "kernel_s_per_step",
                                                                 "peak_allocated_gib")
                   if a[key] is not None and b[key] is not None}
            summary["per_layer"][p] = per
            if per.get("median_step_s", 1) <= 0:
                summary.setdefault("warnings", []).append(
                    f"{p}: the step got no slower from {lo} to {hi} layers (scatter larger than the per-layer cost): "
                    f"its per-layer figures and extrapolation mean nothing")
            ext = {key: a[key] + (FULL_DEPTH - hi) * per[key] for key in per}
            ext["method"] = f"measured at {hi} layers + {FULL_DEPTH - hi} x the per-layer difference of {hi} vs {lo}"
        elif ran:
            d = ran[0]
            scale = flops["total"] / data["flops"][f"{p}@{d}"]["total"]
            ext = {"median_step_s": summary["per_depth"][d][p]["median_step_s"] * scale,
                   "method": f"FLOPs-scaled from {d} layers (constant MFU assumed): one depth only"}
        else:
            continue
        if "median_step_s" in ext:
            ext["tokens_per_s"] = flops["tokens_per_step"] / ext["median_step_s"]
            ext["mfu"] = flops["total"] / ext["median_step_s"] / peak if peak else None
        summary["extrapolated_32"][p] = ext
    e_stock, e_det = summary["extrapolated_32"].get(STOCK, {}), summary["extrapolated_32"].get(DETACHED, {})
    if "median_step_s" in e_stock and "median_step_s" in e_det:
        summary["extrapolated_32"]["throughput_ratio"] = e_stock["median_step_s"] / e_det["median_step_s"]
    if e_stock.get("kernel_s_per_step") and e_det.get("kernel_s_per_step"):
        summary["extrapolated_32"]["kernel_ratio"] = e_stock["kernel_s_per_step"] / e_det["kernel_s_per_step"]
    paired = [d for d, row in summary["per_depth"].items() if "throughput_ratio" in row]
    summary["headline_depth"] = paired[0] if paired else None
    summary["headline"] = summary["per_depth"][paired[0]]["throughput_ratio"] if paired else None
    summary["verdict"] = verdict(summary["headline"], 0.98, True, dry)
    return summary


# ------------------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------------------
def commands(args, out: Path) -> Dict[str, List[str]]:
    """The part commands; ``out`` is the folder their files go to (the work folder's parts/, archived into --out)."""
    dry = args.dry_run
    rprobe = [PYTHON, str(BENCH / "bench_rprobe.py"), "--json", str(out / "rprobe.json")]
    rprobe += ["--tiny", "--device", "cpu", "--dtype", "float32"] if dry else \
        ["--device", "cuda", "--dtype", "bfloat16", "--batch", "8", "--repeats", "5", "--warmup", "2"]
    dpvr = [PYTHON, str(BENCH / "bench_dpvr.py"), "--json", str(out / "dpvr.json"), "--route-layer",
            "4" if dry else "18"]
    dpvr += (["--layers", "8", "--hidden", "128", "--repeats", "2", "--warmup", "1", "--decode-steps", "2",
              "--threads", "1"] if dry else
             ["--layers", "32", "--hidden", "4096", "--device", "cuda", "--dtype", "bfloat16", "--repeats", "10",
              "--warmup", "2", "--decode-steps", "8", "--threads", "4"])
    gpu_tests = [PYTHON, "-m", "pytest", "-m", "gpu", "-s", "-rA", "-p", "no:cacheprovider", "tests/gpu/test_gpu.py"]
    joint = [PYTHON, str(Path(__file__).resolve()), "--part-child", "joint", "--out", str(out), "--work", args.work,
             "--master-port", str(args.master_port)] + (["--dry-run"] if dry else []) + \
        (["--joint-depths", args.joint_depths] if args.joint_depths else [])
    return {"rprobe": rprobe, "dpvr": dpvr, "gpu_tests": gpu_tests, "joint": joint}


def summarise_gpu_tests(log: Path, dry: bool) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    checks = [line.strip() for line in text.splitlines() if line.strip().startswith("GPU-CHECK")]
    outcomes = [line.strip() for line in text.splitlines()
                if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    final = next((line.strip("= ").strip() for line in reversed(text.splitlines()) if line.startswith("=")
                  and (" passed" in line or " skipped" in line or " failed" in line or " error" in line)), "")
    failed = [o for o in outcomes if o.startswith(("FAILED", "ERROR"))]
    passed = [o for o in outcomes if o.startswith("PASSED")]
    skipped = [o.split(": ", 1)[-1] for o in outcomes if o.startswith("SKIPPED")]
    reasons = "; ".join(sorted(set(skipped)))
    if failed:
        state = f"failed ({len(failed)} of {len(outcomes)})"
    elif passed:
        state = f"passed ({len(passed)})" + (f", skipped: {reasons}" if skipped else "")
    elif skipped:
        state = f"skipped ({reasons})"
    else:
        state = "no test ran (see the log)"
    if dry:
        state = f"dry run: {state}"
    return {"checks": checks, "outcomes": outcomes, "summary": final, "verdict": state}


def summarise_rprobe(path: Path, dry: bool) -> dict:
    data = json.loads(path.read_text())
    ratio = data["ratio_probe_step_vs_llm_fb"]
    return {**data, "headline": ratio, "verdict": verdict(ratio, 0.35, False, dry)}


def summarise_dpvr(path: Path, dry: bool, route: int) -> dict:
    data = json.loads(path.read_text())
    t = data["timings"]
    routed = t[f"dpvr_r{route}"]
    key = "prefill_cpu" if dry else "prefill_wall"  # CPU time on a shared CPU, wall time on a GPU
    ratio = routed[key]["median"] / t["stock"][key]["median"]
    kv = routed["kv_cache_mib_after_prompt"] / t["stock"]["kv_cache_mib_after_prompt"]
    decode_key = "decode_cpu" if dry else "decode_wall"
    return {"timings": t, "prefill_key": key, "prefill_ratio": ratio, "kv_ratio": kv,
            "decode_ratio": routed[decode_key]["median"] / t["stock"][decode_key]["median"],
            "route_layer": route, "headline": 1 - ratio, "verdict": verdict(1 - ratio, 0.25, True, dry)}


def fmt(value, digits=3, unit="") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def markdown(results: dict) -> str:
    dry = results["dry_run"]
    m = results["machine"]
    lines = [f"# GPU suite results ({results['date']}{', DRY RUN: CPU, tiny shapes' if dry else ''})", ""]
    if dry:
        lines += ["Dry run: every part's code path with tiny shapes in fp32 on the CPU. The numbers test the suite, "
                  "not the claims; the verdicts say `dry run: ...` for that reason.", ""]
    lines += [f"Command: `{results['command']}`  ",
              f"Machine: {m.get('gpu') or m.get('cpu')}; nvidia-smi: {m.get('nvidia_smi')}; torch {m.get('torch')} "
              f"(CUDA {m.get('torch_cuda')}), transformers {m.get('transformers')}, deepspeed {m.get('deepspeed')}, "
              f"flash-attn {m.get('flash_attn') or 'not importable'}, "
              f"bitsandbytes {m.get('bitsandbytes') or 'absent'}; "
              f"Python {m.get('python')}.  ",
              "Attention: " + "; ".join(f"{k}: {v}" for k, v in m.get("attention", {}).items()) + ".  ",
              f"Wall time: {results['wall_s']:.0f} s for the parts (budget {results['budget_s']:.0f} s)"
              + (f", plus {results['env_s']:.0f} s for the environment ({results.get('env_status')})"
                 if results.get("env_s") is not None else "") + ".",
              "", "| part | measure | result | target | verdict |", "|---|---|---|---|---|"]
    parts = results["parts"]
    for name in ("joint", "gpu_tests", "rprobe", "dpvr"):
        p = parts.get(name, {})
        s = p.get("summary") or {}
        status = p.get("status", "not run")
        title = TITLES[name]
        if status != "done" and not s:
            lines.append(f"| {title} | | | | {status} |")
            continue
        if name == "joint":
            d0 = s.get("headline_depth")
            if d0 is None:
                lines.append(f"| {title} | detached / stock throughput | no depth with both types | >= 0.98 | "
                             f"{s['verdict']} |")
            else:
                row = s["per_depth"][d0]
                lines.append(f"| {title} | detached / stock throughput (wall, median step, {d0} LLM layers) | "
                             f"{fmt(row['throughput_ratio'])} | >= 0.98 | {s['verdict']} |")
                lines.append(f"| | kernel time, stock / detached (profiled steps) | {fmt(row['kernel_ratio'])} | "
                             f"(>= 0.98) | |")
            ext = s.get("extrapolated_32", {})
            if "throughput_ratio" in ext:
                how = "per-layer slope" if s.get("per_layer") else "FLOPs-scaled"
                lines.append(f"| | extrapolated to 32 layers ({how}) | {fmt(ext['throughput_ratio'])} | "
                             f">= 0.98 | {verdict(ext['throughput_ratio'], 0.98, True, dry)} |")
            if status != "done":
                lines.append(f"| | part status | {status} | | |")
        elif name == "gpu_tests":
            lines.append(f"| {title} | {s.get('summary') or 'no pytest summary'} | "
                         f"{'; '.join(s.get('checks', [])) or '-'} | all pass | {s['verdict']} |")
        elif name == "rprobe":
            lines.append(f"| {title} | probe step / LLM forward+backward | {fmt(s['headline'])} | <= 0.35 | "
                         f"{s['verdict']} |")
        elif name == "dpvr":
            lines.append(f"| {title} | prefill latency reduction, R = {s['route_layer']} "
                         f"({'CPU time' if dry else 'wall'}) | {fmt(100 * s['headline'], 1, ' %')} | >= 25 % | "
                         f"{s['verdict']} |")
            lines.append(f"| | KV cache after the prompt, routed / stock | {fmt(s['kv_ratio'])} | (reported) | |")
    for name in ("joint", "gpu_tests", "rprobe", "dpvr"):
        lines += ["", f"## {TITLES[name]}", ""] + part_details(name, parts.get(name, {}), results)
    return "\n".join(lines) + "\n"


def part_details(name: str, part: dict, results: dict) -> List[str]:
    dry = results["dry_run"]
    if "command" not in part:
        return [f"Status: {part.get('status', 'not run')}."]
    lines = [f"Status: {part.get('status', 'not run')}; {part.get('seconds', 0):.0f} s of a "
             f"{part.get('budget_s', 0):.0f} s "
             f"budget. Command: `{' '.join(part.get('command', [])).replace(str(ROOT) + '/', '')}`", ""]
    if part.get("error"):
        lines += ["```", part["error"], "```", ""]
    s = part.get("summary") or {}
    if name == "joint" and part.get("data"):
        data = part["data"]
        shape = data["shape"]
        lines += [f"Shapes: tower {shape['vision_layers']} blocks x {shape['vision_hidden']} (MLP "
                  f"{shape['vision_intermediate']}, {shape['vision_heads']} heads, patch {shape['patch_size']}, "
                  f"{shape['image_size']} px); LLM width {shape['llm_hidden']} (MLP {shape['llm_intermediate']}, "
                  f"{shape['llm_heads']} heads), depth cut to {' and '.join(map(str, shape['depths']))} of "
                  f"{FULL_DEPTH} layers; batch {shape['batch']}, {data['dtype']}, gradient checkpointing, SDPA, "
                  f"ZeRO-3 (scripts/zero3/zero3.json) through scripts/zero3/finetune.sh, one GPU. Tokenizer vocab "
                  f"{data.get('sequence', {}).get('vocab')} (the tiny one; LLaMA's 32000 would add an LM head of "
                  f"{6 * shape['llm_hidden'] * 32000 / 1e9:.2f} GFLOP per token). Sequences: mean "
                  f"{fmt(data.get('sequence', {}).get('mean'), 1)} tokens "
                  f"({data.get('sequence', {}).get('image_tokens')} image tokens). Steps per run: {shape['steps']}, "
                  f"median over steps {shape['warmup'] + 1}..{shape['profile'][0]}, kernel time over the profiled "
                  f"steps {shape['profile'][0] + 1}..{sum(shape['profile'])}. Assets built in "
                  f"{fmt(data.get('assets_s'), 0, ' s')}.", ""]
        lines += ["| depth | projector | median step s | kernel s/step | peak allocated GiB | tokens/s | "
                  "model TFLOP/step | MFU | launch to exit s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for d, row in s.get("per_depth", {}).items():
            for p in (p for p in (STOCK, DETACHED) if p in row):
                r = row[p]
                run = next(x for x in data["runs"] if x["depth"] == int(d) and x["projector"] == p)
                lines.append(f"| {d} | `{p}` | {fmt(r['median_step_s'])} | {fmt(r['kernel_s_per_step'])} | "
                             f"{fmt(r['peak_allocated_gib'], 2)} | {fmt(r['tokens_per_s'], 0)} | "
                             f"{r['model_tflops_per_step']:.3g} | {fmt(r['mfu'] and 100 * r['mfu'], 1, ' %')} | "
                             f"{run['launch_to_exit_s']:.0f} |")
        if s.get("per_layer"):
            lines += ["", "Per LLM layer (difference between the two depths, divided by the layer count) and the "
                      f"linear extrapolation to {FULL_DEPTH} layers (measured depth + slope x the missing layers; "
                      "an extrapolation, not a measurement):", "",
                      "| projector | step s / layer | kernel s / layer | GiB / layer | 32 layers: step s | kernel s | "
                      "peak GiB | tokens/s | MFU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for p in (p for p in (STOCK, DETACHED) if p in s["per_layer"]):
                per, ext = s["per_layer"][p], s["extrapolated_32"][p]
                lines.append(f"| `{p}` | {fmt(per.get('median_step_s'), 4)} | {fmt(per.get('kernel_s_per_step'), 4)} | "
                             f"{fmt(per.get('peak_allocated_gib'), 3)} | {fmt(ext.get('median_step_s'))} | "
                             f"{fmt(ext.get('kernel_s_per_step'))} | {fmt(ext.get('peak_allocated_gib'), 1)} | "
                             f"{fmt(ext.get('tokens_per_s'), 0)} | "
                             f"{fmt(ext.get('mfu') and 100 * ext['mfu'], 1, ' %')} |")
        lines += [f"- Warning: {w}" for w in s.get("warnings", [])]
        for p in (STOCK, DETACHED):
            ext = s.get("extrapolated_32", {}).get(p)
            if ext and p not in s.get("per_layer", {}):
                lines.append(f"- `{p}` at {FULL_DEPTH} layers: {fmt(ext.get('median_step_s'))} s/step, "
                             f"{fmt(ext.get('tokens_per_s'), 0)} tokens/s ({ext['method']}; not a per-layer "
                             f"measurement).")
        for key, label in (("skipped_runs", "Skipped runs"), ("failed_runs", "Failed runs")):
            for r in data.get(key, []):
                lines.append(f"- {label[:-1]}: depth {r['depth']} `{r['projector']}`: "
                             f"{r.get('why') or r.get('error', '')[-600:]}")
        peak = results.get("peak_tflops")
        peak_text = f"{peak:.1f} TFLOP/s dense bf16" if peak else "unknown for this device: MFU not given"
        lines += ["", f"MFU = model FLOPs per step / (median step time x peak), peak {peak_text}. "
                  "Model FLOPs (recomputation from gradient checkpointing not counted):", "", "```",
                  (data.get("flops_formula") or "").strip(), "```"]
    elif name == "gpu_tests" and s:
        lines += ["```"] + (s.get("outcomes") or ["(no test outcome lines)"]) + s.get("checks", []) + \
                 [s.get("summary", "")] + ["```"]
    elif name == "rprobe" and s:
        sh = s["shapes"]
        lines += [f"{sh['layers']} layers x {sh['hidden']} (MLP {sh['intermediate']}, {sh['heads']} heads, vocab "
                  f"{sh['vocab']}), batch {sh['batch']} x {sh['tokens']} visual tokens, probe depth "
                  f"{sh['probe_depth']} ({s['parameters']['probe'] / 1e6:.0f} M parameters vs the LLM's "
                  f"{s['parameters']['llm'] / 1e6:.0f} M), {s['dtype']} on {s['gpu']}; medians of {s['repeats']} "
                  f"rounds after {s['warmup']} warm-up rounds, alternating order.", "",
                  "| call | median ms | peak MiB over before |", "|---|---:|---:|"]
        for call, value in s["median_s"].items():
            lines.append(f"| {call} | {1e3 * value:.2f} | {fmt(s['peak_mib'][call] if not dry else None, 0)} |")
        lines += ["", f"probe step / LLM forward+backward = **{s['ratio_probe_step_vs_llm_fb']:.3f}**; probe "
                  f"forward+backward / LLM forward+backward = {s['ratio_probe_fb_vs_llm_fb']:.3f}."]
    elif name == "dpvr" and s:
        lines += ["| variant | prefill median s [min, max] | decode step median ms | KV cache MiB | "
                  "GPU prefill peak over allocated MiB |", "|---|---:|---:|---:|---:|"]
        key = s["prefill_key"]
        dkey = key.replace("prefill", "decode")
        for variant, t in s["timings"].items():
            mem = t.get("cuda_memory", {}).get("prefill_peak_over_allocated_mib")
            lines.append(f"| {variant} | {t[key]['median']:.4f} [{t[key]['min']:.4f}, {t[key]['max']:.4f}] | "
                         f"{t[dkey]['median']:.2f} | {t['kv_cache_mib_after_prompt']:.1f} | {fmt(mem, 0)} |")
        lines += ["", f"Prefill R = {s['route_layer']} / stock: **{s['prefill_ratio']:.3f}** ({key.split('_')[1]} "
                  f"time), i.e. {100 * s['headline']:.1f} % lower; decode step {s['decode_ratio']:.3f}; KV cache "
                  f"{s['kv_ratio']:.3f}. 35 text tokens + 576 image tokens + 20 question tokens, batch 1."]
    if part.get("log_tail") and part.get("status") != "done":
        lines += ["", "Log tail:", "```", part["log_tail"], "```"]
    return lines


def archive_parts(parts_dir: Path, out: Path) -> None:
    """Per-part logs, JSON and profile tables in one archive: $OUT keeps four files (the device tool brings back
    at most eight)."""
    tmp = out / "gpu_suite_files.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as archive:
        for path in sorted(parts_dir.iterdir()):
            if path.is_file():
                archive.add(path, arcname=path.name)
    os.replace(tmp, out / "gpu_suite_files.tar.gz")


def save_progress(results: dict, out: Path, parts_dir: Path, began: float) -> None:
    """The report so far, after every part: a suite stopped from outside still leaves its results."""
    results["wall_s"] = time.time() - began
    write_json(out / "gpu_suite.json", results)
    (out / "gpu_suite.md").write_text(markdown(results))
    archive_parts(parts_dir, out)


def render(path: Path) -> None:
    """Re-summarise the joint part from its stored runs and rewrite gpu_suite.md beside ``path``."""
    results = json.loads(path.read_text())
    joint = results["parts"].get("joint", {})
    if joint.get("data", {}).get("runs"):
        peak = results["peak_tflops"] * 1e12 if results.get("peak_tflops") else None
        joint["summary"] = summarise_joint(joint["data"], str(results["machine"].get("gpu") or ""), peak,
                                           results["dry_run"])
    write_json(path, results)
    report = markdown(results)
    path.with_suffix(".md").write_text(report)
    print(report)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out")
    parser.add_argument("--work", default=None, help="model weights and runs (default: a temporary folder)")
    parser.add_argument("--dry-run", "--tiny", dest="dry_run", action="store_true",
                        help="CPU, tiny shapes, fp32: the same code paths")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts (default: the sum of the "
                        "per-part budgets)")
    parser.add_argument("--wall-limit", type=float, default=None,
                        help="seconds for the environment (--env-seconds) and the parts together; the parts' budget "
                             "shrinks to fit (default 570 on a GPU, under the device tool's 600 s per command; "
                             "none in a dry run)")
    parser.add_argument("--joint-depths", default=None, help="LLM depths for part 1, e.g. 8,4 (default)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--master-port", type=int, default=29787)
    parser.add_argument("--env-seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--env-status", default="ready", help=argparse.SUPPRESS)
    parser.add_argument("--render", default=None, metavar="GPU_SUITE_JSON",
                        help="rewrite the Markdown (and the joint part's summary) from a results file; runs nothing")
    parser.add_argument("--part-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.part_child == "joint":
        part_joint(args, out / "joint.json", args.deadline or time.time() + 3600)
        return

    began = time.time()
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-suite-")
    os.environ["PATH"] = os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", "")  # this env's deepspeed
    os.environ["PYTHONUNBUFFERED"] = "1"
    budgets = dict(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
    total = args.budget or sum(budgets.values())
    selected = [p for p in PARTS if p in args.parts.split(",")]
    command = " ".join(["python scripts/bench/gpu_suite.py"] + (argv if argv is not None else sys.argv[1:]))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
               "command": command, "budget_s": total, "env_s": args.env_seconds,
               "env_status": args.env_status, "parts": {}}
    print("[gpu-suite] machine info ...", flush=True)
    results["machine"] = machine_info()
    device = str(results["machine"].get("gpu") or "")
    peak = peak_flops(device, args.peak_tflops)
    results["peak_tflops"] = peak / 1e12 if peak else None
    parts_dir = Path(args.work) / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    cmds = commands(args, parts_dir)
    deadline = began + total
    wall_limit = args.wall_limit if args.wall_limit is not None else (None if args.dry_run else 570.0)
    if wall_limit:
        deadline = min(deadline, began - (args.env_seconds or 0) + wall_limit)
        results["wall_limit_s"] = wall_limit
    spare = 0.0
    for name in PARTS:
        if name not in selected:
            results["parts"][name] = {"status": "skipped (not selected with --parts)"}
            continue
        remaining = deadline - time.time()
        budget = min(budgets[name] + spare, remaining)
        part = {"command": cmds[name], "budget_s": budget}
        results["parts"][name] = part
        if budget < 15:
            part["status"] = f"skipped (no time left: {remaining:.0f} s of the {total:.0f} s budget)"
            continue
        log = parts_dir / f"{name}.log"
        print(f"[gpu-suite] {name}: budget {budget:.0f} s ...", flush=True)
        command_line = cmds[name] + (["--deadline", str(time.time() + budget - 10)] if name == "joint" else [])
        run = run_group(command_line, log, budget)
        part.update(seconds=run["seconds"], rc=run["rc"])
        spare = max(0.0, budget - run["seconds"])
        if run["timed_out"]:
            part["status"] = f"stopped at its time budget ({budget:.0f} s)"
        elif run["rc"] != 0:
            part["status"] = f"failed (exit code {run['rc']})"
        else:
            part["status"] = "done"
        part["log_tail"] = tail(log)
        try:
            if name == "joint" and (parts_dir / "joint.json").exists():
                part["data"] = json.loads((parts_dir / "joint.json").read_text())
                if part["data"].get("runs"):
                    part["summary"] = summarise_joint(part["data"], device, peak, args.dry_run)
                if part["status"] == "done" and not part["data"].get("runs"):
                    part["status"] = "failed (no run finished)"
            elif name == "gpu_tests":
                part["summary"] = summarise_gpu_tests(log, args.dry_run)
                if "skipped (" in part["summary"]["verdict"] and part["status"] == "done" and \
                        "passed" not in part["summary"]["verdict"]:
                    part["status"] = part["summary"]["verdict"].replace("dry run: ", "")
            elif name == "rprobe" and part["status"] == "done":
                part["summary"] = summarise_rprobe(parts_dir / "rprobe.json", args.dry_run)
            elif name == "dpvr" and part["status"] == "done":
                part["summary"] = summarise_dpvr(parts_dir / "dpvr.json", args.dry_run, 4 if args.dry_run else 18)
        except Exception as error:  # noqa: BLE001 - a part whose output cannot be read is named, not fatal
            part["error"] = f"reading its results failed: {error.__class__.__name__}: {error}"
        print(f"[gpu-suite] {name}: {part['status']} in {run['seconds']:.0f} s", flush=True)
        save_progress(results, out, parts_dir, began)
    results["wall_s"] = time.time() - began
    write_json(out / "gpu_suite.json", results)
    report = markdown(results)
    (out / "gpu_suite.md").write_text(report)
    archive_parts(parts_dir, out)
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)
    print(report)


if __name__ == "__main__":
    main()
