"""The frameworks' DSL settings as each integration reads them (no framework needed: runs in every environment)."""
import pytest

from llava_dsl.integrations import DSLOptions, configure, parse_layers
from llava_dsl.integrations.axolotl import DSLArgs, options_from_cfg


def test_layer_forms():
    assert parse_layers("3,1", "x") == parse_layers("[3, 1]", "x") == parse_layers([3, 1], "x") == [3, 1]
    assert parse_layers(2, "x") == [2] and parse_layers("", "x") is None and parse_layers(None, "x") is None
    with pytest.raises(ValueError, match=r"dsl_detach_layers='3,a': 'a' is not an integer"):
        parse_layers("3,a", "dsl_detach_layers")


def test_axolotl_keys():
    assert set(DSLArgs.model_fields) == {"dsl_detach_layers", "dsl_detach_depth", "dsl_off"}
    options = options_from_cfg({"dsl_detach_layers": [3, 1]})
    assert options.detach_layers == [3, 1] and options.requested and not options.off
    assert not options_from_cfg({}).requested  # no key: the plugin does nothing
    with pytest.raises(ValueError, match="freeze_mm_modules: true freezes the vision tower.*freeze_mm_modules: false"):
        options_from_cfg({"dsl_detach_depth": 1, "freeze_mm_modules": True})


def test_off_and_layers_together_is_refused():
    class Model:
        config = None

    with pytest.raises(ValueError, match="dsl_off together with detach layers"):
        configure(Model(), DSLOptions(detach_layers=[1], off=True, source="test"))
    assert configure(Model(), DSLOptions(source="test")) is None  # nothing asked, no config key: untouched
