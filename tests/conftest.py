"""Fixtures shared by the whole suite; plain helpers live in support.py."""
import os

import pytest
from support import TOWER_LR, llava_flags, run_module


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices run hundreds of small ops: on a shared CPU a second thread only adds waits at every op.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny LLaMA LM + 8-block CLIP tower + rendered-text LLaVA datasets, built once per session."""
    from llava_dsl.assets.tiny_models import build_all

    return build_all(str(tmp_path_factory.mktemp("assets")), seed=0, num_samples=16)


@pytest.fixture(scope="session")
def pretrained_assets(tmp_path_factory):
    """The demo's pretrained parts (tower 'slots', the text-pretrained LM and the untrained one the demo starts
    from), built once per session by ``python -m llava_dsl.assets build`` into the session's own cache folder, so
    the tests neither read nor fill the user's. Returns that folder and each build's output."""
    root = str(tmp_path_factory.getbasetemp() / "llava_dsl_assets")
    printed = {lm: run_module("llava_dsl.assets", ["build", "--root", root, "--lm", lm], timeout=3600).stdout
               for lm in ("pretrained", "random")}
    return root, printed


@pytest.fixture(scope="session")
def runs(tiny_assets, tmp_path_factory):
    """Stage 1 (adapter only) then joint stage 2 with Detached Skip-Links, through the real CLI."""
    out = tmp_path_factory.mktemp("runs")
    pre = str(out / "llava-pre")
    ft = str(out / "llava-ft")
    run_module("llava_dsl.train", llava_flags(tiny_assets, "pretrain", pre))
    run_module("llava_dsl.train", llava_flags(
        tiny_assets, "finetune", ft, pretrain_mm_mlp_adapter=os.path.join(pre, "mm_projector.bin"),
        unfreeze_mm_vision_tower=True, mm_vision_tower_lr=TOWER_LR))
    return {"pre": pre, "ft": ft, "out": out}


