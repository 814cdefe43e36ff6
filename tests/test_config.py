"""params.yaml: the project's file and each profile parse; a misspelt key is refused with its name."""
import copy

import pytest
import yaml

from procs import ROOT
from mdsgen.config import apply_profile, load_params, parse_params

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("profile", sorted(RAW["profiles"]))
def test_the_projects_params_and_every_profile_parse(profile):
    assert load_params(ROOT / "params.yaml").profile == RAW["profile"]
    p = parse_params(apply_profile(copy.deepcopy(RAW), profile))
    assert p.profile == profile


@pytest.mark.parametrize("section", ["audio", "video", "sampling", "train", "dataset", "vae_train", "model", "vae",
                                     "frame_encoder", "features", "mlflow", "evaluate", "align", "serving",
                                     "monitoring", "ablations", "app"])
def test_a_misspelt_key_is_refused_with_its_name(section):
    raw = copy.deepcopy(RAW)
    raw[section] = dict(raw.get(section) or {}, stpes=3)
    with pytest.raises(ValueError, match=rf"\[{section}\]: unknown keys \['stpes'\]"):
        parse_params(raw)


def test_every_section_is_a_typed_frozen_config():
    from dataclasses import FrozenInstanceError, fields, is_dataclass

    p = load_params(ROOT / "params.yaml")
    for f in fields(p):
        if f.name == "profile":
            continue
        section = getattr(p, f.name)
        assert is_dataclass(section) and type(section).__dataclass_params__.frozen, f.name
        with pytest.raises(FrozenInstanceError):
            setattr(section, fields(section)[0].name, None)
    with pytest.raises(FrozenInstanceError):  # the whole: a stage cannot swap a section under another
        p.train = None
    bigger = p.model.with_values(size="S", depth=6)  # the model's settings change by copy, in params.yaml's order
    assert bigger.as_dict() == {**RAW["model"], "size": "S", "depth": 6} and p.model.as_dict() == RAW["model"]
    ci = parse_params(apply_profile(copy.deepcopy(RAW), "ci"))
    assert ci.evaluate.checks is None and load_params(ROOT / "params.yaml").evaluate.checks.min_conditioning_gain > 1


def test_a_value_out_of_its_choices_is_refused_with_the_key():
    raw = copy.deepcopy(RAW)
    raw["evaluate"] = dict(raw["evaluate"], aisfx_band="wide")
    with pytest.raises(ValueError, match="evaluate.aisfx_band 'wide'"):
        parse_params(raw)
    raw = copy.deepcopy(RAW)
    raw["audio"] = dict(raw["audio"], lowpass_hz=-8000)
    with pytest.raises(ValueError, match="audio.lowpass_hz -8000"):
        parse_params(raw)
