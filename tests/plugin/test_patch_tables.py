"""Every touch of someone else's internals is in a table: swaps into ``llava`` only through the features'
``PATCHES`` (applied by ``register()``), and private ``transformers.Trainer`` names only as ``TRAINER_INTERNALS``
lists them."""
import ast
import inspect
import pathlib
import re

import transformers

import llava_dsl
from llava_dsl import plugin

PACKAGE = pathlib.Path(llava_dsl.__file__).parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "hf":
            continue  # the Hugging Face path touches transformers models, never llava
        yield path, ast.parse(path.read_text())


def _llava_names(tree):
    """Names a module binds to llava modules or objects (``import llava.x as y``, ``from llava.x import Y``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "llava"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llava" and node.level == 0:
            names |= {a.asname or a.name for a in node.names}
    return names


def test_no_module_assigns_into_llava_outside_the_patch_tables():
    offences = []
    for path, tree in _modules():
        llava_names = _llava_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute):
                    root = target
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in llava_names:
                        offences.append(f"{path.name}:{node.lineno} {ast.unparse(target)} = ...")
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in llava_names):
                offences.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not offences, "swaps into llava outside a PATCHES table: " + "; ".join(offences)


def test_register_applies_exactly_the_tables_and_nothing_is_left_unregistered():
    llava_dsl.register()
    assert plugin.is_registered()
    swapped = {(id(owner), name) for owner, name, _, _ in plugin.ALL_PATCHES}
    assert len(swapped) == len(plugin.ALL_PATCHES), "two table rows swap the same name"
    assert all(reason.strip() for *_, reason in plugin.ALL_PATCHES), "every swap says why"
    import llava.train.train as llava_train

    assert llava_train.LLaVATrainer is plugin.DSLTrainer  # the aux-loss trainer is part of it, not a later swap
    llava_dsl.register()  # idempotent
    assert plugin.is_registered()


def _trainer_private_names():
    names = {n for n in dir(transformers.Trainer) if n.startswith("_") and not n.startswith("__")}
    return names | set(re.findall(r"self\.(_[a-zA-Z]\w*)", inspect.getsource(transformers.trainer)))


def test_private_trainer_names_the_plugin_uses_are_listed():
    private = _trainer_private_names()
    listed = {name for name, *_ in plugin.TRAINER_INTERNALS}
    used = set()
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                used |= {(f.name, path.name) for f in node.body
                         if isinstance(f, ast.FunctionDef) and f.name in private}
            if isinstance(node, ast.Attribute) and node.attr in private and ast.unparse(node.value) in (
                    "self", "trainer", "self.trainer"):
                used.add((node.attr, path.name))
    assert used, "the scan found nothing: it is broken"
    missing = sorted(f"{name} ({where})" for name, where in used if name not in listed)
    assert not missing, f"private transformers.Trainer names used but not in plugin.TRAINER_INTERNALS: {missing}"
    stale = sorted(name for name, kind, *_ in plugin.TRAINER_INTERNALS
                   if kind != "behaviour" and name not in {n for n, _ in used})
    assert not stale, f"TRAINER_INTERNALS names what the plugin no longer uses: {stale}"
