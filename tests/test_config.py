import json
import re
import typing

import pytest
import yaml

from optin_hf import OptinConfig
from optin_hf.tasks.recipes import parse_recipe


def test_defaults_follow_the_paper():
    c = OptinConfig()
    assert (c.mac_constraint, c.temperature, c.lambda_contribution, c.md_tokens, c.num_samples) == (0.6, 4.0, 10.0, 768, 128)
    assert not c.faithful  # the paper's score, MD + balanced KL: OPTIN's, the first recipe importance="auto" tries
    assert c.importance == "auto"


def test_round_trip_dict_and_json(tmp_path):
    c = OptinConfig(mac_constraint=0.5, importance="magnitude", seq_len=30.5, faithful=False)
    assert OptinConfig.from_dict(c.to_dict()) == c
    path = c.save_pretrained(tmp_path)
    assert path.name == "optin_config.json" and json.loads(path.read_text())["mac_constraint"] == 0.5
    assert OptinConfig.from_pretrained(tmp_path) == c


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"importance": "nope"}, "importance='nope' is unknown"),
        ({"prune_heads": False, "prune_neurons": False}, "nothing would be pruned"),
        ({"batch_size": 0}, "batch_size=0 must be a positive"),
        ({"engine": "warp"}, "engine='warp' is unknown"),
        ({"reconstruct": "bias"}, "reconstruct='bias' is unknown"),
        ({"reconstruct_ridge": -1.0}, "reconstruct_ridge=-1.0 must be a finite number"),
        ({"reconstruct_ridge": float("nan")}, "reconstruct_ridge=nan must be a finite number"),
        ({"reconstruct_ridge": float("inf")}, "reconstruct_ridge=inf must be a finite number"),
        ({"reconstruct_ridge": 0.0, "selection": "refit", "reconstruct": "weights"}, "selection='refit' inverts .* reconstruct_ridge > 0"),
        ({"reconstruct_samples": 0}, "reconstruct_samples=0 must be a positive"),
        ({"prune_steps": 2, "reconstruct": "none"}, "prune_steps=2 re-scores a reconstructed model"),
        ({"prune_steps": 2, "prune_tokens": True}, "token mode .* prunes in one step"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptinConfig(**kwargs)


def test_unknown_keys_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="Unknown OptinConfig keys"):
        OptinConfig.from_dict({"mac": 0.5})
    with pytest.raises(FileNotFoundError, match="optin_config.json"):
        OptinConfig.from_pretrained(tmp_path)


def test_token_settings_and_the_seeded_share():
    c = OptinConfig()
    assert not c.prune_tokens and c.token_cut_share is None
    shares = {OptinConfig(seed=s).resolved_token_cut_share() for s in range(20)}
    assert all(0.15 <= s <= 0.30 for s in shares) and len(shares) == 20
    assert OptinConfig(seed=3).resolved_token_cut_share() == OptinConfig(seed=3).resolved_token_cut_share()
    assert OptinConfig(token_cut_share=0.5).resolved_token_cut_share() == 0.5
    with pytest.raises(ValueError, match=r"token_cut_share=1.5 is outside \[0, 1\]"):
        OptinConfig(token_cut_share=1.5)
    with pytest.raises(ValueError, match="must be positive"):
        OptinConfig(max_patch_envelope=0)


FIELD_TYPES = typing.get_type_hints(OptinConfig)
FLOAT_FIELDS = [name for name, hint in FIELD_TYPES.items() if float in (typing.get_args(hint) or (hint,))]
REQUIRED_FIELDS = [name for name, hint in FIELD_TYPES.items() if type(None) not in typing.get_args(hint)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"faithful": "false"}, r"faithful='false' is a str; expected a bool .* unquoted"),
        ({"prune_tokens": 1}, r"prune_tokens=1 is an int; expected a bool"),
        ({"mac_constraint": "0.6"}, r"mac_constraint='0.6' is a str; expected a finite number\. Write it unquoted"),
        ({"num_samples": 2.5}, r"num_samples=2.5 is a float; expected an integer"),
        ({"seed": 1.5}, r"seed=1.5 is a float; expected an integer"),
        ({"num_samples": True}, r"num_samples=True is a bool; expected an integer"),
        ({"temperature": True}, r"temperature=True is a bool; expected a finite number"),
        ({"variants_per_batch": 2.0}, r"variants_per_batch=2.0 is a float; expected an integer or None"),
        ({"importance": 3}, r"importance=3 is an int; expected a string"),
        ({"extra": ["a"]}, r"extra=\['a'\] is a list; expected a mapping"),
        ({"seq_len": float("inf")}, r"seq_len=inf must be a finite number or None"),
    ],
)
def test_each_field_refuses_a_value_of_the_wrong_type(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptinConfig(**kwargs)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_every_float_field_refuses_nan_and_infinity(name, value):
    assert {"mac_constraint", "temperature", "seq_len", "reconstruct_ridge"} <= set(FLOAT_FIELDS)  # the table finds them
    with pytest.raises(ValueError, match=f"{name}={value!r} must be a finite number"):
        OptinConfig(**{name: value})


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
def test_none_only_where_the_field_allows_it(name):
    with pytest.raises(ValueError, match=f"{name}=None is a NoneType; expected"):
        OptinConfig(**{name: None})


def test_ints_are_numbers_and_optional_fields_take_none(tmp_path):
    c = OptinConfig(mac_constraint=1, temperature=2, seq_len=30, max_scoring_time=90, checkpoint_dir=tmp_path)
    assert (c.mac_constraint, c.temperature, c.seq_len, c.max_scoring_time) == (1.0, 2.0, 30.0, 90.0)
    assert all(type(v) is float for v in (c.mac_constraint, c.temperature, c.seq_len, c.max_scoring_time))
    assert c.checkpoint_dir == str(tmp_path)
    assert OptinConfig(seq_len=None, token_cut_share=None, variants_per_batch=None).seq_len is None
    assert OptinConfig(faithful=True, num_samples=16, seed=-3).faithful is True


@pytest.mark.parametrize(
    "text, message",
    [
        ('"faithful": "false"', "faithful='false' is a str; expected a bool"),
        ('"temperature": NaN', "temperature=nan must be a finite number"),
        ('"num_samples": 12.5', "num_samples=12.5 is a float; expected an integer"),
    ],
)
def test_a_saved_config_with_a_bad_value_is_refused(tmp_path, text, message):
    values = {k: v for k, v in OptinConfig().to_dict().items() if k != text.split('"')[1]}
    (tmp_path / "optin_config.json").write_text(json.dumps(values)[:-1] + ", " + text + "}")
    with pytest.raises(ValueError, match=message):
        OptinConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('faithful: "false"', "optin: faithful='false' is a str; expected a bool"),
        ("temperature: .nan", "optin: temperature=nan must be a finite number"),
        ("reconstruct_ridge: 1e-3", r"reconstruct_ridge='1e-3' is a str; .* 1.0e-3, not 1e-3"),
        ("seed: 1.5", "seed=1.5 is a float; expected an integer"),
    ],
)
def test_a_recipe_with_a_bad_value_is_refused(line, message):
    text = f"default: bbc-news\noptin:\n  mac_constraint: 0.5\n  {line}\n"
    with pytest.raises(ValueError, match=message):
        parse_recipe(yaml.safe_load(text), "optin")
    assert parse_recipe(yaml.safe_load("default: bbc-news\noptin: {faithful: false, reconstruct_ridge: 1.0e-3}"), "r").optin.faithful is False


@pytest.mark.parametrize("field, value", [("seed", 2**70), ("neuron_group_size", 10**20), ("md_tokens", -(2**64))])
def test_an_integer_setting_beyond_64_bits_is_refused_naming_it(field, value):
    # torch would fail mid-run: "Overflow when unpacking long long" (no field named) or an OverflowError traceback
    with pytest.raises(ValueError, match=rf"{field}={value} does not fit in 64 bits"):
        OptinConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("temperature", 1e300), ("lambda_contribution", 1e-320)])
def test_a_scale_that_would_overflow_the_scores_is_refused_up_front(field, value):
    # else an OverflowError from the power-of-ten balance in the middle of scoring
    with pytest.raises(ValueError, match=rf"{field}={re.escape(repr(value))} is outside \[1e-100, 1e\+100\].*overflow float64"):
        OptinConfig(**{field: value})


@pytest.mark.parametrize("values", [[], [{"seed": 1}], None, "mac_constraint"])
def test_an_optin_config_json_that_is_not_a_mapping_is_refused_naming_the_file(tmp_path, values):
    (tmp_path / "optin_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=rf"optin_config.json: OptinConfig settings must be a mapping .*not an? {type(values).__name__}"):
        OptinConfig.from_pretrained(tmp_path)
