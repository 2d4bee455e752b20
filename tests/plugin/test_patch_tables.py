"""Every touch of someone else's internals is in a table: swaps into ``llava`` only through the features'
``PATCHES`` (applied by ``register()``), and private ``transformers.Trainer`` names only as ``TRAINER_INTERNALS``
lists them (the stock Hugging Face path ``llava_dsl/hf`` included). The package's shape: imports point one way
(no cycle, the idea in ``skip_links`` imports no feature built on it) and the README's layout is the filesystem."""
import ast
import inspect
import pathlib
import re

import transformers

import llava_dsl
from llava_dsl import plugin

PACKAGE = pathlib.Path(llava_dsl.__file__).parent
ROOT = PACKAGE.parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
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
    """Private Trainer names of this transformers and of the stock Hugging Face environments' (``llava_dsl/hf``
    runs on those), read from their trainer.py where they are built."""
    names = {n for n in dir(transformers.Trainer) if n.startswith("_") and not n.startswith("__")}
    sources = [inspect.getsource(transformers.trainer)] + [
        path.read_text() for path in sorted(ROOT.glob(".venv-hf*/lib/python*/site-packages/transformers/trainer.py"))]
    for source in sources:
        names |= set(re.findall(r"self\.(_[a-zA-Z]\w*)", source)) | set(re.findall(r"def (_[a-zA-Z]\w*)\(self", source))
    return names


def test_private_trainer_names_the_plugin_uses_are_listed():
    """Each (name, module) pair: a listed name used by another module (``_save_checkpoint`` overridden in ``hf/``
    too) is a new dependency on transformers' internals and must be listed there as well."""
    private = _trainer_private_names()
    listed = {(name, where) for name, kind, where, _ in plugin.TRAINER_INTERNALS if kind != "behaviour"}
    used = set()
    for path, tree in _modules():
        where = _module_name(path).removeprefix("llava_dsl.")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                used |= {(f.name, where) for f in node.body if isinstance(f, ast.FunctionDef) and f.name in private}
            if isinstance(node, ast.Attribute) and node.attr in private and ast.unparse(node.value) in (
                    "self", "trainer", "self.trainer"):
                used.add((node.attr, where))
    assert used, "the scan found nothing: it is broken"
    missing = sorted(f"{name} ({where})" for name, where in used - listed)
    assert not missing, f"private transformers.Trainer names used but not in plugin.TRAINER_INTERNALS: {missing}"
    stale = sorted(f"{name} ({where})" for name, where in listed - used)
    assert not stale, f"TRAINER_INTERNALS names what the plugin no longer uses: {stale}"


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph():
    """Module -> the package modules it imports, at any depth of its code (a lazy import is still a dependency).
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``; parent packages are left
    out (importing ``a.b`` runs ``a/__init__.py`` too, which is not a dependency the module chose)."""
    paths = {_module_name(path): path for path, _ in _modules()}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base] * bool(base))
                imported |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {target for target in imported if target in paths and target != name}
    return graph


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_point_one_way():
    graph = _import_graph()
    assert graph["llava_dsl.plugin"] >= {"llava_dsl.skip_links.llava_patches", "llava_dsl.dpvr.llava_patches"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail
    assert _cycles(graph) == [], "import cycles between the package's modules"
    features = ("llava_dsl.dpvr", "llava_dsl.rprobe", "llava_dsl.diagnostics", "llava_dsl.hf", "llava_dsl.plugin",
                "llava_dsl.demo", "llava_dsl.study", "llava_dsl.evaluate")
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() if name.startswith("llava_dsl.skip_links")
                    for target in targets if target.startswith(features))
    assert upward == [], "the idea (skip_links) imports a feature built on it; compose them in llava_dsl/plugin.py"


def _readme_layout():
    """The README's layout of llava_dsl/: top-level module names, and each folder with the .py names its entry
    mentions."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("\n    llava_dsl/\n"):text.index("\n    patches/")].splitlines()[2:]
    entries = []
    for line in block:
        if line.startswith("      ") and not line.startswith("       "):
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
    top, folders = set(), {}
    for entry in entries:
        first = entry.split()[0]
        if first.endswith("/"):
            folders[first.rstrip("/")] = set(re.findall(r"\b(\w+\.py)\b", entry))
        else:
            top |= set(re.findall(r"^(?:\w+\.py\s+)+", entry + " ")[0].split())
    return top, folders


def test_readme_layout_is_the_filesystem():
    top, folders = _readme_layout()
    assert top == {p.name for p in PACKAGE.glob("*.py")}, "README.md's layout vs the modules in llava_dsl/"
    on_disk = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(folders) == on_disk, "README.md's layout vs the folders in llava_dsl/"
    for folder, named in folders.items():
        files = {p.name for p in (PACKAGE / folder).glob("*.py")} - {"__init__.py", "__main__.py"}
        assert named == files, (f"README.md's layout names {sorted(named)} in llava_dsl/{folder}/, which holds "
                                f"{sorted(files)}: name each module in the folder's entry")
