"""``torch.compile(model)``: the Detached Skip-Links hook is traced into the compiled graph (the compiled shallow-block
gradient equals the eager hooked one, not the naive one), the guard still refuses an un-hooked DSL config, and
``unwrap_model`` sees through ``OptimizedModule``.

The backend is ``aot_eager``: TorchDynamo traces the module and its hooks and AOTAutograd builds the joint
forward/backward graph, which is where a hook could be lost; inductor only generates the kernels of that graph
(measured once on 2 CPU cores: about 4 minutes to compile this tiny model, the shallow-block gradient within 4e-10 of
eager's at a scale of 7e-4), too slow for the suite. The gradient test still compiles the whole tiny model (about
30 s of CPU, 90 s on 2 loaded cores), so it is marked ``launch``: make test-hf5 runs it once; the guard test stops at
the first traced module and stays in process."""
import pytest
import torch
from hf_helpers import assert_same
from test_core import backward, build

from llava_dsl.hf import DSLNotAppliedError, apply_detached_skip_links, is_applied, unwrap_model


def _compiled_grads(compiled, inputs, prefix):
    compiled.zero_grad(set_to_none=True)
    compiled(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in unwrap_model(compiled).named_parameters()
            if n.startswith(prefix) and p.grad is not None}


@pytest.mark.launch
def test_compiled_model_trains_with_the_hook():
    torch._dynamo.reset()
    model, inputs, prefix = build("llava")
    model.train()
    naive = backward(model, inputs, prefix)
    compiled = torch.compile(model, backend="aot_eager")
    assert unwrap_model(compiled) is model
    apply_detached_skip_links(compiled, detach_layers=[1])  # through the compiled wrapper
    assert is_applied(model) and model.config.dsl_detach_layers == [1]
    eager = backward(model, inputs, prefix)
    got = _compiled_grads(compiled, inputs, prefix)
    assert_same(got, eager, "compiled vs eager, hooked")
    shallow = [k for k in got if "layers.0." in k]
    assert shallow and any(not torch.equal(got[k], naive[k]) for k in shallow)


def test_the_guard_fires_under_compile():
    torch._dynamo.reset()
    model, inputs, _ = build("llava")
    model.config.dsl_detach_layers = [1]  # e.g. from_pretrained of a DSL checkpoint: the config asks, no hook
    compiled = torch.compile(model, backend="aot_eager")
    compiled.train()
    with pytest.raises(DSLNotAppliedError, match=r"dsl_detach_layers=\[1\].*apply_detached_skip_links"):
        compiled(**inputs)
