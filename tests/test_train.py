import pytest

from train import Config, PRESETS, evaluate, parse_args


def test_overrides_and_presets(capsys):
    cfg = parse_args(["--preset=tiny", "--lora_r=2", "--temperature=1", "--lora_targets=['q_proj']", "--out_dir=x/y"])
    assert (cfg.preset, cfg.lora_r, cfg.temperature, cfg.lora_targets, cfg.out_dir) == \
        ("tiny", 2, 1.0, ("q_proj",), "x/y")
    assert cfg.group_size == PRESETS["tiny"]["group_size"]  # from the preset
    assert "override: lora_r = 2" in capsys.readouterr().out
    assert parse_args([]) == Config()


@pytest.mark.parametrize("argv,msg", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--lora_r=x"], "config key 'lora_r' wants int, got 'x'"),
    (["--lora_r=2.5"], "config key 'lora_r' wants int"),
    (["--preset=big"], "unknown preset 'big'"),
    (["lora_r=2"], "arguments are --key=value"),
])
def test_bad_overrides(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        parse_args(argv)


def test_evaluate_scores_heldout(tiny):
    from data import make_split
    cfg = parse_args(["--preset=tiny"])
    samples = make_split("test", 3)
    scores, texts = evaluate(tiny, samples, cfg)
    assert len(texts) == 3
    assert set(scores) == {"format", "f1_action", "f1_subject", "f1_goal", "f1", "reward"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
