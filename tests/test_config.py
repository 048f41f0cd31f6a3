"""Config overrides from the command line, and the JSON round trip of a run directory."""
import pytest

from jnn import config as C
from jnn import presets


def test_override_coerces_types():
    cfg = C.override(presets.get("digits"), [
        "optim.learning_rate=3e-4", "train.steps=12", "data.augment=crop", "optim.clip_norm=1",
        "data.normalize=true", "train.early_stopping=accuracy", "model.dropout_rate=0.1",
        "optim.boundaries=(5, 9)", "data.data_dir=None",
    ])
    assert cfg.optim.learning_rate == 3e-4 and isinstance(cfg.train.steps, int) and cfg.train.steps == 12
    assert cfg.data.augment == ("crop",) and cfg.optim.clip_norm == 1.0 and cfg.data.normalize is True
    assert cfg.train.early_stopping == "accuracy" and cfg.model.kwargs["dropout_rate"] == 0.1
    assert cfg.optim.boundaries == (5, 9) and cfg.data.data_dir is None


@pytest.mark.parametrize("assignment, match", [
    ("optim.learning_rat=1", r"unknown config key 'optim.learning_rat'; expected one of \['optim.name', 'optim.learning_rate'.*Did you mean 'optim.learning_rate'"),
    ("optimizer.name=sgd", r"unknown config key 'optimizer.name'; expected one of \['model.name'"),
    ("train.steps=many", r"train.steps: expected int; got 'many'"),
    ("data.normalize=maybe", r"expected true or false"),
    ("learning_rate", r"expects section.key=value"),
    ("train.steps=None", r"None is not allowed"),
])
def test_bad_overrides_say_what_is_valid(assignment, match):
    with pytest.raises(ValueError, match=match):
        C.override(C.Config(), [assignment])


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_round_trips_through_json(name):
    for debug in (False, True):
        cfg = presets.get(name, debug=debug)
        assert C.from_dict(C.to_dict(cfg)) == cfg


def test_unknown_preset_and_config_keys():
    with pytest.raises(ValueError, match=r"unknown preset 'mlp_mnst'.*Did you mean 'mlp_mnist'"):
        presets.get("mlp_mnst")
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        C.from_dict({"train": {"bogus": 1}})
