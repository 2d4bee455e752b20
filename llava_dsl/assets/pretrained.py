"""Locally pretrained tiny parts that read: a CLIP vision tower trained on rendered digit strings and a LLaMA-style
LM trained on the tokenizer's corpus, both ordinary Hugging Face folders, built once and cached.

    python -m llava_dsl.assets build [--variant slots|dense] [--root DIR] [--quick]
    python -m llava_dsl.assets path  [--variant ...]      (print the folders, build if missing)

Nothing is downloaded. Everything follows from the settings (one frozen dataclass per part), and the folders are
cached under ``ROOT/<part>-<key>/`` where ``key`` is a hash of those settings and ``FORMAT_VERSION``:

    ROOT = $LLAVA_DSL_ASSETS, else ~/.cache/llava_dsl/assets
    ROOT/tower-slots-<key>/      CLIPVisionModel + CLIPImageProcessor (``--vision_tower``), BUILD.json
    ROOT/tower-dense-<key>/      the same, pretrained on the dense objective only
    ROOT/lm-<key>/               LlamaForCausalLM + LlamaTokenizer (``--model_name_or_path``), BUILD.json

A part is built in a hidden staging folder (``.partial-<name>-<pid>``) and renamed into place after its
``BUILD.json`` is written, so a folder with the final name is always complete; a killed build leaves only a
staging folder, which the next build removes. A lock file serialises two builds of the same part.

**Tower variants** (``TOWER_VARIANTS``; the throw-away heads are dropped after pretraining):

- ``slots`` (the demo's): patch tokens 0..S-1 of the select layer (LLaVA's ``-2``) each predict the k-th
  character of the string or END ("canonical slots"), plus a dense head on block 2. The tower itself puts the
  string in reading order, so the LLM only has to copy the first S visual tokens.
- ``dense``: every patch token predicts the character centred in it (or none), at block 2 and at the select
  layer; no slot head, so the LLM must find the characters and their order itself.

The images are fresh renders every step, drawn by ``llava_dsl.assets.ocr_data.render`` with the training font
sizes and never a held-out string; the reported accuracy is on held-out strings at held-out sizes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from llava_dsl.checkpointing.atomic import atomic_folder, atomic_write_text

# Bump when the files built for the same settings change, so that old cached folders are not reused.
FORMAT_VERSION = 1

MANIFEST = "BUILD.json"

ENV_ROOT = "LLAVA_DSL_ASSETS"

CHARSET = "0123456789"


@dataclass(frozen=True)
class TowerSettings:
    """One tower variant: the architecture, the data and the pretraining recipe."""
    variant: str
    slot_head: bool
    dense_layers: Tuple[int, ...]       # hidden-state indices with a dense per-patch head
    dense_char_weight: float = 10.0     # loss weight of a character target against "none" (most patch halves)
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    blocks: int = 6
    heads: int = 4
    mlp_width: int = 256
    select_layer: int = -2              # LLaVA's mm_vision_select_layer: the slots live here
    min_digits: int = 2
    max_digits: int = 5
    steps: int = 2400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    eval_images: int = 512
    eval_every: int = 400


TOWER_VARIANTS: Dict[str, TowerSettings] = {
    "slots": TowerSettings(variant="slots", slot_head=True, dense_layers=(2,)),
    "dense": TowerSettings(variant="dense", slot_head=False, dense_layers=(2, 5)),
}


@dataclass(frozen=True)
class LMSettings:
    """The LM and its tokenizer: ``llava_dsl.assets.tiny_models``' tokenizer and corpus, a longer-trained LM."""
    seed: int = 0
    vocab_size: int = 512
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_width: int = 256
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    heldout_lines: int = 400


# "pretrained": trained on the tokenizer's corpus. "random": the same LM and tokenizer, not trained (steps=0), the
# one the demo uses: with the pretrained LM, stage 2 of the demo stayed on the answer-length plateau (loss 1.45
# after 150 steps, 0 % held-out exact match); with the random one its loss fell to 0.7 by step 100 (docs/demo.md).
LM_VARIANTS: Dict[str, LMSettings] = {"pretrained": LMSettings(), "random": LMSettings(steps=0)}


def lm_settings(variant: str = "pretrained", **changes) -> LMSettings:
    if variant not in LM_VARIANTS:
        raise AssetError(f"LM variant {variant!r}: expected one of {sorted(LM_VARIANTS)}")
    return replace(LM_VARIANTS[variant], **changes)


class AssetError(RuntimeError):
    """A cached folder that cannot be used or built; the message names it."""


def default_root() -> str:
    return os.path.abspath(os.environ.get(ENV_ROOT) or os.path.join(os.path.expanduser("~"), ".cache", "llava_dsl",
                                                                     "assets"))


def tower_settings(variant: str = "slots", **changes) -> TowerSettings:
    if variant not in TOWER_VARIANTS:
        raise AssetError(f"tower variant {variant!r}: expected one of {sorted(TOWER_VARIANTS)}")
    return replace(TOWER_VARIANTS[variant], **changes)


def quick(settings):
    """A reduced build for tests: half the steps (the tower still reads, less well; see docs/demo.md)."""
    if isinstance(settings, TowerSettings):
        return replace(settings, steps=max(1, settings.steps // 2), eval_images=256, eval_every=10 ** 9)
    return replace(settings, steps=settings.steps // 2)


def cache_key(settings) -> str:
    """A hash of the part's settings and FORMAT_VERSION: the same on every machine and run."""
    payload = json.dumps({"format_version": FORMAT_VERSION, "part": type(settings).__name__, **asdict(settings)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def folder_name(settings) -> str:
    prefix = f"tower-{settings.variant}" if isinstance(settings, TowerSettings) else "lm"
    return f"{prefix}-{cache_key(settings)}"


def _log(message: str) -> None:
    print(f"[assets] {message}", flush=True)


# --------------------------------------------------------------------------------------------- the cache

def _read_manifest(folder: str) -> Optional[Dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(root: str, name: str) -> Iterator[None]:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(root: str, name: str) -> List[str]:
    """Remove staging folders of ``name`` whose build process is gone (a killed build); returns them."""
    removed = []
    if not os.path.isdir(root):
        return removed
    prefix = f".partial-{name}-"
    for entry in sorted(os.listdir(root)):
        if entry.startswith(prefix):
            pid = entry[len(prefix):]
            if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
                removed.append(entry)
    return removed


def cached(settings, root: Optional[str] = None) -> Optional[str]:
    """The complete cached folder for ``settings``, or None."""
    folder = os.path.join(root or default_root(), folder_name(settings))
    manifest = _read_manifest(folder)
    if manifest is not None and manifest.get("key") == cache_key(settings):
        return folder
    return None


def ensure(settings, root: Optional[str] = None, log=_log) -> str:
    """The folder for ``settings``: the cached one, else built now (atomically) and returned."""
    root = os.path.abspath(root or default_root())
    name = folder_name(settings)
    final = os.path.join(root, name)
    with _locked(root, name):
        if cached(settings, root):
            return final
        if os.path.exists(final):
            raise AssetError(f"{final} exists but has no valid {MANIFEST} for these settings, so it was not written "
                             f"by a finished build; remove it and build again")
        for entry in remove_stale_partials(root, name):
            log(f"removed {os.path.join(root, entry)}: left by a build that did not finish")
        with atomic_folder(final, os.path.join(root, f".partial-{name}-{os.getpid()}")) as staging:
            started = time.time()
            if isinstance(settings, TowerSettings):
                report = train_tower(settings, staging, log=log)
            else:
                report = train_lm(settings, staging, log=log)
            manifest = {"key": cache_key(settings), "format_version": FORMAT_VERSION, "part": name,
                        "settings": asdict(settings), "build_seconds": round(time.time() - started, 1),
                        "torch_threads": _torch_threads(), "load_average": list(os.getloadavg()), **report}
            atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1))
    return final


def build(variant: str = "slots", root: Optional[str] = None, reduced: bool = False, log=_log,
          tower: Optional[TowerSettings] = None, lm: Optional[LMSettings] = None,
          lm_variant: str = "pretrained") -> Dict[str, str]:
    """The tower of ``variant`` and the LM of ``lm_variant``, cached; returns ``{"vision_tower", "llm",
    "tower_report", "lm_report"}`` (folders and their BUILD.json). ``reduced`` builds the quick versions (tests)."""
    tower = tower or tower_settings(variant)
    lm = lm or lm_settings(lm_variant)
    if reduced:
        tower, lm = quick(tower), quick(lm)
    tower_dir = ensure(tower, root, log)
    lm_dir = ensure(lm, root, log)
    return {"vision_tower": tower_dir, "llm": lm_dir, "tower_report": os.path.join(tower_dir, MANIFEST),
            "lm_report": os.path.join(lm_dir, MANIFEST)}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------- the tower

def _normalise(images) -> "torch.Tensor":
    import numpy as np
    import torch

    from llava_dsl.assets.tiny_models import CLIP_MEAN, CLIP_STD

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    array = (array - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def render_batch(settings: TowerSettings, rng: random.Random, count: int, heldout: bool):
    """``count`` fresh renders of digit strings through the package's renderer; returns (pixels, targets).

    targets: ``slots`` [count, S] (character index, or END = len(CHARSET), or -100 past END) and ``dense``
    [count, patches] (1 + index of the character centred in the patch, the one nearest its centre when two
    are, or 0 for none)."""
    import torch

    from llava_dsl.assets.ocr_data import digit_style, render, sample_digits

    grid = settings.image_size // settings.patch_size
    slots = settings.max_digits + 1
    style = digit_style(heldout)
    images, texts = [], []
    slot_targets = torch.full((count, slots), -100, dtype=torch.long)
    dense_targets = torch.zeros((count, grid * grid), dtype=torch.long)
    for i in range(count):
        text = sample_digits(rng, settings.min_digits, settings.max_digits, heldout)
        image, rendered = render(text, "number", settings.image_size, rng, style)
        images.append(image)
        texts.append(text)
        nearest: Dict[int, float] = {}
        for k, char in enumerate(text):
            slot_targets[i, k] = CHARSET.index(char)
            cx, cy = rendered.centres[k]
            col = min(grid - 1, max(0, int(cx // settings.patch_size)))
            row = min(grid - 1, max(0, int(cy // settings.patch_size)))
            patch = row * grid + col
            offset = abs(cx - (col + 0.5) * settings.patch_size)
            if offset < nearest.get(patch, math.inf):
                nearest[patch] = offset
                dense_targets[i, patch] = 1 + CHARSET.index(char)
        slot_targets[i, len(text)] = len(CHARSET)
    return _normalise(images), {"slots": slot_targets, "dense": dense_targets, "texts": texts}


def _select_index(settings: TowerSettings) -> int:
    return settings.select_layer % (settings.blocks + 1)


class _Heads:
    """The throw-away pretraining heads (plain torch modules, dropped after the build)."""

    def __init__(self, settings: TowerSettings):
        import torch

        self.settings = settings
        self.slots = settings.max_digits + 1
        self.modules = torch.nn.ModuleDict()
        if settings.slot_head:
            self.modules["slots"] = torch.nn.Linear(settings.width, len(CHARSET) + 1)
        for layer in settings.dense_layers:
            self.modules[f"dense{layer}"] = torch.nn.Linear(settings.width, len(CHARSET) + 1)

    def losses(self, hidden_states, targets) -> Dict[str, "torch.Tensor"]:
        import torch.nn.functional as F

        out = {}
        if self.settings.slot_head:
            tokens = hidden_states[_select_index(self.settings)][:, 1:1 + self.slots]
            logits = self.modules["slots"](tokens)
            out["slots"] = F.cross_entropy(logits.flatten(0, 1), targets["slots"].flatten(), ignore_index=-100)
        for layer in self.settings.dense_layers:
            logits = self.modules[f"dense{layer}"](hidden_states[layer][:, 1:])
            weight = logits.new_full((len(CHARSET) + 1,), self.settings.dense_char_weight)
            weight[0] = 1.0
            out[f"dense{layer}"] = F.cross_entropy(logits.flatten(0, 1), targets["dense"].flatten(), weight=weight)
        return out

    def read(self, hidden_states) -> Dict[str, List[str]]:
        """The strings each head reads: slots up to END; dense patches in reading order (row-major)."""
        read = {}
        if self.settings.slot_head:
            tokens = hidden_states[_select_index(self.settings)][:, 1:1 + self.slots]
            predicted = self.modules["slots"](tokens).argmax(-1).tolist()
            read["slots"] = ["".join(CHARSET[c] for c in _until_end(row)) for row in predicted]
        for layer in self.settings.dense_layers:
            logits = self.modules[f"dense{layer}"](hidden_states[layer][:, 1:])
            predicted = logits.argmax(-1).tolist()
            read[f"dense{layer}"] = ["".join(CHARSET[c - 1] for c in row if c) for row in predicted]
        return read


def _until_end(row: Sequence[int]) -> List[int]:
    out = []
    for c in row:
        if c == len(CHARSET):
            break
        out.append(c)
    return out


def char_accuracy(predicted: str, truth: str) -> float:
    """Share of the truth's positions read right (a longer or shorter reading counts the missing ones wrong)."""
    hits = sum(p == t for p, t in zip(predicted, truth))
    return hits / max(len(truth), len(predicted))


def tower_config(settings: TowerSettings):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=settings.width, intermediate_size=settings.mlp_width,
                            projection_dim=settings.width, num_hidden_layers=settings.blocks,
                            num_attention_heads=settings.heads, num_channels=3, image_size=settings.image_size,
                            patch_size=settings.patch_size, torch_dtype="float32")


def evaluate_tower(model, heads: _Heads, settings: TowerSettings, count: int) -> Dict[str, Dict[str, float]]:
    """Held-out recognition: held-out strings at held-out font sizes, a fixed seeded set."""
    import torch

    rng = random.Random(f"tower-eval-{settings.seed}")
    scores: Dict[str, Dict[str, float]] = {}
    model.eval()
    with torch.no_grad():
        done = 0
        while done < count:
            n = min(128, count - done)
            pixels, targets = render_batch(settings, rng, n, heldout=True)
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
            for head, strings in heads.read(hidden).items():
                entry = scores.setdefault(head, {"char": 0.0, "string": 0.0})
                for got, truth in zip(strings, targets["texts"]):
                    entry["char"] += char_accuracy(got, truth)
                    entry["string"] += float(got == truth)
            done += n
    model.train()
    return {head: {"char_accuracy": v["char"] / count, "string_accuracy": v["string"] / count, "n": count}
            for head, v in scores.items()}


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tower(settings: TowerSettings, out_dir: str, log=_log) -> Dict:
    """Pretrain a tiny CLIPVisionModel on fresh renders; save it with its CLIPImageProcessor to ``out_dir``."""
    import torch
    from transformers import CLIPVisionModel

    from llava_dsl.assets.tiny_models import save_image_processor

    if settings.image_size % settings.patch_size:
        raise AssetError(f"image_size {settings.image_size} is not a multiple of patch_size {settings.patch_size}")
    if (settings.image_size // settings.patch_size) ** 2 < settings.max_digits + 1 and settings.slot_head:
        raise AssetError("fewer patch tokens than slots")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = CLIPVisionModel(tower_config(settings))
        heads = _Heads(settings)
    params = list(model.parameters()) + list(heads.modules.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    rng = random.Random(f"tower-train-{settings.seed}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tower '{settings.variant}': CLIP {settings.blocks} blocks x {settings.width}, {n_params / 1e3:.0f}k "
        f"parameters; {settings.steps} steps of {settings.batch_size} fresh renders")
    started, history, recent = time.time(), [], []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, settings.warmup_steps, settings.lr)
        pixels, targets = render_batch(settings, rng, settings.batch_size, heldout=False)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        losses = heads.losses(hidden, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        recent.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == settings.steps:
            entry = {"step": done, "loss": sum(recent) / len(recent), "seconds": round(time.time() - started, 1)}
            recent = []
            if done % settings.eval_every == 0 and done < settings.steps:
                entry["heldout"] = evaluate_tower(model, heads, settings, min(256, settings.eval_images))
            history.append(entry)
            log(f"tower step {done}/{settings.steps}: loss {entry['loss']:.3f} ({entry['seconds']:.0f}s)"
                + (f", held-out {_summary(entry['heldout'])}" if "heldout" in entry else ""))
    train_seconds = time.time() - started
    heldout = evaluate_tower(model, heads, settings, settings.eval_images)
    log(f"tower '{settings.variant}' held-out ({settings.eval_images} images, unseen strings and font sizes): "
        f"{_summary(heldout)}")
    model.save_pretrained(out_dir, safe_serialization=True)
    save_image_processor(out_dir, settings.image_size)
    main_head = "slots" if settings.slot_head else f"dense{max(settings.dense_layers)}"
    return {"parameters": n_params, "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / max(1, settings.steps), 4),
            "heldout": heldout, "heldout_head": main_head,
            "char_accuracy": heldout[main_head]["char_accuracy"],
            "string_accuracy": heldout[main_head]["string_accuracy"], "history": history}


def _summary(heldout: Dict[str, Dict[str, float]]) -> str:
    return ", ".join(f"{head} {v['char_accuracy'] * 100:.1f}% char / {v['string_accuracy'] * 100:.1f}% string"
                     for head, v in heldout.items())


# --------------------------------------------------------------------------------------------- the LM

def _token_stream(tokenizer, lines: Sequence[str]) -> List[int]:
    ids: List[int] = []
    for line in lines:
        ids += [tokenizer.bos_token_id] + tokenizer.encode(line, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids


def _perplexity(model, stream: List[int], seq_len: int) -> float:
    import torch

    chunks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(chunks), 64):
            batch = torch.tensor(chunks[i:i + 64])
            loss = model(input_ids=batch, labels=batch).loss
            n = batch.shape[0] * (seq_len - 1)
            total += float(loss) * n
            count += n
    model.train()
    return math.exp(total / count)


def train_lm(settings: LMSettings, out_dir: str, log=_log) -> Dict:
    """Tokenizer (``tiny_models.build_tokenizer``) + a LLaMA-style LM trained on the same corpus; held-out
    perplexity on lines of the corpus generator with another seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from llava_dsl.assets.tiny_models import build_corpus, build_tokenizer

    tokenizer_dir = os.path.join(out_dir, ".tokenizer")
    build_tokenizer(tokenizer_dir, vocab_size=settings.vocab_size, seed=settings.seed)
    tokenizer = LlamaTokenizer.from_pretrained(tokenizer_dir, legacy=False)
    shutil.rmtree(tokenizer_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=settings.width, intermediate_size=settings.mlp_width,
                         num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                         num_key_value_heads=settings.heads, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(config)
    train_stream = _token_stream(tokenizer, build_corpus(settings.seed))
    heldout_stream = _token_stream(tokenizer, build_corpus(settings.seed + 1_000_003)[:settings.heldout_lines])
    perplexity_before = _perplexity(model, heldout_stream, settings.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    rng = random.Random(f"lm-train-{settings.seed}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"LM: LLaMA {settings.layers} layers x {settings.width}, {n_params / 1e3:.0f}k parameters; {settings.steps} "
        f"steps of {settings.batch_size} x {settings.seq_len} tokens from the tokenizer's corpus "
        f"({len(train_stream)} tokens)")
    started, history = time.time(), []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, settings.warmup_steps, settings.lr)
        starts = [rng.randrange(len(train_stream) - settings.seq_len) for _ in range(settings.batch_size)]
        batch = torch.tensor([train_stream[s:s + settings.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            history.append({"step": step + 1, "loss": loss.item(), "seconds": round(time.time() - started, 1)})
            log(f"LM step {step + 1}/{settings.steps}: loss {history[-1]['loss']:.3f} ({time.time() - started:.0f}s)")
    train_seconds = time.time() - started
    perplexity = _perplexity(model, heldout_stream, settings.seq_len)
    log(f"LM held-out perplexity {perplexity:.2f} (untrained: {perplexity_before:.1f}; {len(heldout_stream)} tokens)")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": n_params, "train_seconds": round(train_seconds, 1), "heldout_perplexity": perplexity,
            "heldout_perplexity_untrained": perplexity_before, "heldout_tokens": len(heldout_stream),
            "history": history}
