import json

import pytest

from optin_hf import OptinConfig


def test_defaults_follow_the_paper():
    c = OptinConfig()
    assert (c.mac_constraint, c.temperature, c.lambda_contribution, c.md_tokens, c.num_samples) == (0.6, 4.0, 10.0, 768, 128)
    assert c.importance == "optin" and not c.faithful  # the paper's score: MD + balanced KL


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
