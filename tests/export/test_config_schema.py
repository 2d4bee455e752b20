"""One table of the plugin's config keys: every key a feature writes is in it, and the exporter obeys it."""
import ast
import pathlib

import pytest

from llava_dsl import config_schema
from llava_dsl.config_schema import BY_NAME, PLUGIN_CONFIG_KEYS

PACKAGE = pathlib.Path(config_schema.__file__).parent
# Keys LLaVA itself defines that the plugin may set on LLaVA's behalf; and transformers' own attributes.
NOT_THE_PLUGINS = {"_attn_implementation"}


def _config_assignments():
    """(file, line, key) for every ``<...>config.<key> = ...`` and ``setattr(<...>config, "<key>", ...)``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "hf" in path.relative_to(PACKAGE).parts[:1]:
            continue  # the Hugging Face path writes stock transformers configs, with its own keys (llava_dsl.hf)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and ast.unparse(target.value).split(".")[-1] == "config":
                    found.append((path.name, node.lineno, target.attr))
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args
                    and ast.unparse(node.args[0]).split(".")[-1] == "config" and isinstance(node.args[1], ast.Constant)):
                found.append((path.name, node.lineno, node.args[1].value))
    return found


def test_every_config_key_the_package_writes_is_in_the_table():
    written = _config_assignments()
    assert written, "the scan found no config writes at all: it is broken"
    missing = [(f, line, key) for f, line, key in written if key not in BY_NAME and key not in NOT_THE_PLUGINS]
    assert not missing, f"config keys written but not listed in llava_dsl.config_schema: {missing}"


def test_the_table_is_consistent():
    names = [key.name for key in PLUGIN_CONFIG_KEYS]
    assert len(names) == len(set(names))
    assert {key.export for key in PLUGIN_CONFIG_KEYS} <= {config_schema.MAPPED, config_schema.TRAINING_ONLY,
                                                         config_schema.REFUSED}
    assert config_schema.keys_of("dpvr") == tuple(n for n in names if n.startswith(("mm_routing", "dpvr_")))
    with pytest.raises(KeyError, match="nope"):
        config_schema.keys_of("nope")


def test_every_refused_key_alone_makes_the_export_refuse():
    from llava_dsl.export_hf import ExportError, check_supported

    base = {"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"}
    check_supported(base)
    for key in (k for k in PLUGIN_CONFIG_KEYS if k.export == config_schema.REFUSED):
        with pytest.raises(ExportError, match=key.name):
            check_supported({**base, key.name: 3})
