#!/usr/bin/env bash
# The GPU suite's Python environment (scripts/bench/gpu_suite.sh calls `install` itself).
#
#   bash scripts/bench/gpu_env.sh fetch     # on a machine WITH the package index: wheels for the GPU machine
#                                           # (CPython 3.12, manylinux x86_64) into build/gpu_wheels (~21 MB)
#   bash scripts/bench/gpu_env.sh install   # on the GPU machine: a venv at $GPU_VENV, ready in ~30 s
#   bash scripts/bench/gpu_env.sh check     # what that venv imports, one line each
#
# Two ways to install, chosen by what is there:
#   offline (build/gpu_wheels holds wheels, the default for the project's GPU machine, which reaches no package
#     index): the venv reuses the CUDA torch of the machine's own python3 (a .pth line adds that interpreter's
#     site-packages after the venv's own, so the venv's pins win) and installs the carried wheels with
#     --no-index --no-deps: the LLaVA-1.5 stack of constraints.txt (transformers 4.37.2, tokenizers 0.15.2,
#     accelerate 0.34.2, peft 0.10.0, deepspeed 0.18.9), huggingface_hub < 1, deepspeed's pydantic/hjson (with the
#     typing_extensions >= 4.16 pydantic needs), llava-torch 1.2.2.post1 and bitsandbytes (only its CUDA 13 and CPU
#     libraries kept, to fit the 64 MiB the device tool carries). This checkout is put on the venv's path (a .pth
#     line): the equivalent of `pip install -e .` without a build step. flash-attn is not installed (it compiles
#     for minutes); it is used only if the machine's python3 already has it. The machine's other packages stay
#     visible behind the venv's: one that transformers 4.37 imports optionally and that needs a newer
#     huggingface_hub (a recent `datasets`, absent from the project's GPU image) would break the imports; `check`
#     runs that import chain and names it.
#   online (no wheels, or GPU_ENV_ONLINE=1; a cluster with the index): README's install section, in a fresh venv:
#     torch==2.13.0 (resolves to a CUDA build on a CUDA machine), deepspeed with --no-build-isolation,
#     llava-torch --no-deps, the package with [test], bitsandbytes.
#
# Variables: GPU_VENV (default /tmp/llava-dsl-gpu-venv), GPU_WHEELS (default build/gpu_wheels in this checkout),
# BASE_PYTHON (default python3: the interpreter whose torch is reused offline), GPU_ENV_ONLINE=1,
# FETCH_PYTHON (default .venv/bin/python: builds the deepspeed wheel, so it needs torch), GPU_PY_VERSION (3.12).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPU_VENV=${GPU_VENV:-/tmp/llava-dsl-gpu-venv}
GPU_WHEELS=${GPU_WHEELS:-$ROOT/build/gpu_wheels}
BASE_PYTHON=${BASE_PYTHON:-python3}
GPU_PY_VERSION=${GPU_PY_VERSION:-3.12}
FETCH_PYTHON=${FETCH_PYTHON:-$ROOT/.venv/bin/python}
BITSANDBYTES=${BITSANDBYTES:-bitsandbytes==0.50.2}
# CUDA builds of bitsandbytes kept in the slimmed wheel (torch.version.cuda 13.0 -> libbitsandbytes_cuda130.so)
BNB_KEEP=${BNB_KEEP:-cpu cuda130 cuda132}

die() {
    printf 'gpu_env.sh: %s\n' "$*" >&2
    exit 1
}

# constraints.txt is the one place the LLaVA-1.5 stack is pinned
pin() {
    local line
    line=$(grep -E "^$1==" "$ROOT/constraints.txt") || die "constraints.txt pins no $1"
    printf '%s\n' "$line"
}

fetch() {
    local -a pins platform
    [ -x "$FETCH_PYTHON" ] || die "FETCH_PYTHON=$FETCH_PYTHON: not an interpreter (make venv builds .venv)"
    mkdir -p "$GPU_WHEELS"
    rm -f "$GPU_WHEELS"/*.whl
    pins=("$(pin transformers)" "$(pin tokenizers)" "$(pin accelerate)" "$(pin peft)"
        "huggingface_hub==0.36.2" "hjson==3.1.0" "pydantic==2.14.4" "pydantic_core==2.50.5"
        "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing_extensions==4.16.0" "llava-torch==1.2.2.post1"
        "$BITSANDBYTES")
    platform=(--only-binary=:all: --python-version "$GPU_PY_VERSION" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
    "$FETCH_PYTHON" -m pip download --quiet --no-deps "${platform[@]}" -d "$GPU_WHEELS" "${pins[@]}"
    # deepspeed ships an sdist only; its wheel is pure Python (ops compile just in time), built here once
    DS_BUILD_OPS=0 "$FETCH_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$GPU_WHEELS" "$(pin deepspeed)"
    "$FETCH_PYTHON" - "$GPU_WHEELS" "$BNB_KEEP" <<'EOF'
import glob, os, sys, zipfile
folder, keep = sys.argv[1], ["libbitsandbytes_" + k + ".so" for k in sys.argv[2].split()]
for path in glob.glob(os.path.join(folder, "bitsandbytes-*.whl")):
    slim = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist()
                   if os.path.basename(i.filename).startswith("libbitsandbytes_") and os.path.basename(i.filename) not in keep}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",", 1)[0].decode() not in dropped)
            dst.writestr(info, data)
    os.replace(slim, path)
    print(f"bitsandbytes wheel slimmed to {os.path.getsize(path) / 2**20:.1f} MiB (kept {', '.join(keep)})")
EOF
    (cd "$GPU_WHEELS" && printf '%s\n' *.whl >MANIFEST.txt)
    du -sh "$GPU_WHEELS"
    printf 'carry it to the GPU machine: run(carry=["%s"], ...)\n' "${GPU_WHEELS#"$ROOT"/}"
}

site_packages() {
    "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

install_offline() {
    local base_site venv_site
    local -a pip
    base_site=$("$BASE_PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') ||
        die "BASE_PYTHON=$BASE_PYTHON has no torch to reuse; set BASE_PYTHON, or GPU_ENV_ONLINE=1 with a package index"
    if "$BASE_PYTHON" -m venv "$GPU_VENV" 2>/dev/null; then
        pip=("$GPU_VENV/bin/python" -m pip)
    else  # an interpreter without ensurepip: the base interpreter's pip installs into the venv
        rm -rf "$GPU_VENV"
        "$BASE_PYTHON" -m venv --without-pip "$GPU_VENV"
        pip=("$BASE_PYTHON" -m pip --python "$GPU_VENV/bin/python")
    fi
    "${pip[@]}" install --quiet --no-index --no-deps --no-compile --disable-pip-version-check "$GPU_WHEELS"/*.whl
    # Only now (pip would otherwise take a package of the same version in the machine's site-packages as installed,
    # and skip it): the machine's CUDA torch and everything else it has, AFTER the venv's own packages, so the
    # pinned transformers, accelerate, peft... win over the machine's newer ones; and this checkout.
    venv_site=$(site_packages "$GPU_VENV/bin/python")
    printf 'import site; site.addsitedir(%s)\n' "'$base_site'" >"$venv_site/zz_gpu_base_site.pth"
    printf '%s\n' "$ROOT" >"$venv_site/llava_dsl_checkout.pth"
}

install_online() {
    local py="$GPU_VENV/bin/python"
    "$BASE_PYTHON" -m venv "$GPU_VENV"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet torch==2.13.0
    "$py" -m pip install --quiet -c "$ROOT/constraints.txt" setuptools wheel ninja packaging py-cpuinfo psutil pydantic hjson msgpack numpy
    "$py" -m pip install --quiet -c "$ROOT/constraints.txt" --no-build-isolation deepspeed
    "$py" -m pip install --quiet --no-deps llava-torch==1.2.2.post1
    "$py" -m pip install --quiet -c "$ROOT/constraints.txt" -e "${ROOT}[test]"
    "$py" -m pip install --quiet -c "$ROOT/constraints.txt" "$BITSANDBYTES" || echo "bitsandbytes did not install: the QLoRA test will skip"
}

check() {
    [ -x "$GPU_VENV/bin/python" ] || die "no venv at GPU_VENV=$GPU_VENV (run: bash scripts/bench/gpu_env.sh install)"
    PATH="$GPU_VENV/bin:$PATH" "$GPU_VENV/bin/python" - <<'EOF'
import importlib, importlib.util, shutil
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("transformers", "tokenizers", "accelerate", "peft", "deepspeed", "llava", "llava_dsl", "bitsandbytes",
             "flash_attn"):
    if importlib.util.find_spec(name) is None:
        print(f"{name}: not installed")
        continue
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'importable')} ({module.__file__})")
    except Exception as error:
        print(f"{name}: import fails: {error.__class__.__name__}: {error}")
print(f"deepspeed launcher: {shutil.which('deepspeed')}")
# the chain the suite's training runs import: a machine package that transformers 4.37 imports optionally and that
# needs a newer stack (a recent `datasets`, say) breaks it here, named, instead of in every part
import llava_dsl
llava_dsl.register()
import llava.train.train  # noqa: F401
from transformers import Trainer  # noqa: F401
print("training imports: ok (llava_dsl.register, llava.train.train, transformers.Trainer)")
EOF
}

install() {
    local began=$SECONDS
    if [ -f "$GPU_VENV/.llava-dsl-gpu-ready" ]; then
        printf 'reusing %s\n' "$GPU_VENV"
    else
        rm -rf "$GPU_VENV"
        if [ "${GPU_ENV_ONLINE:-0}" != 1 ] && compgen -G "$GPU_WHEELS/*.whl" >/dev/null; then
            printf 'offline install from %s into %s\n' "$GPU_WHEELS" "$GPU_VENV"
            install_offline
        else
            printf 'online install (README) into %s\n' "$GPU_VENV"
            install_online
        fi
        touch "$GPU_VENV/.llava-dsl-gpu-ready"
    fi
    check || {
        printf 'environment built in %d s, but its check failed (above): %s\n' $((SECONDS - began)) "$GPU_VENV/bin/python"
        return 3
    }
    printf 'environment ready in %d s: %s\n' $((SECONDS - began)) "$GPU_VENV/bin/python"
}

case "${1:-}" in
    fetch) fetch ;;
    install) install ;;
    check) check ;;
    *) die "usage: bash scripts/bench/gpu_env.sh fetch|install|check" ;;
esac
