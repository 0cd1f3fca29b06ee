"""Run config: YAML + dotted overrides, and clear errors for bad keys and values."""

from pathlib import Path

import pytest

from vdm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "base.yaml", "bench.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "configs" / name)
    assert config.model.dim > 0 and config.train.steps > 0


def test_overrides_parse_values_as_yaml():
    config = load_config(ROOT / "configs/demo.yaml",
                         ["train.lr=2e-4", "model.dim_mults=[1,2]", "data.shards=/x/y", "diffusion.min_snr_gamma=5",
                          "train.precision=fp16", "log.sample_prompts=[a cat, a dog]"])
    assert config.train.lr == 2e-4
    assert config.model.dim_mults == (1, 2)
    assert config.data.shards == "/x/y"
    assert config.diffusion.min_snr_gamma == 5.0 and isinstance(config.diffusion.min_snr_gamma, float)
    assert config.train.precision == "fp16"
    assert config.log.sample_prompts == ["a cat", "a dog"]


def test_unknown_key_names_it_and_close_matches():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/demo.yaml", ["train.learning_rte=1e-4"])
    assert "train.learning_rte" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.save_evry=10"])
    assert "did you mean train.save_every" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'modle'.*did you mean model"):
        load_config(None, ["modle.dim=3"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.precision=fp8"])
    assert "train.precision" in str(err.value) and "bf16, fp16, fp32" in str(err.value)
    with pytest.raises(ConfigError, match="diffusion.objective.*eps"):
        load_config(None, ["diffusion.objective=score"])
    with pytest.raises(ConfigError, match="sample.sampler.*dpmpp"):
        load_config(None, ["sample.sampler=euler"])


def test_bad_types_and_ranges():
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="train.steps: must be > 0"):
        load_config(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match="diffusion.cond_drop_prob: must be in"):
        load_config(None, ["diffusion.cond_drop_prob=1.5"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, ["model.gradient_checkpointing=maybe"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")


def test_train_cli_rejects_bad_key_before_starting(capsys):
    from vdm.training.cli import main

    assert main(["--config", str(ROOT / "configs/demo.yaml"), "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_deepspeed_config_is_generated_from_train_and_merged_with_a_json():
    from vdm.training.engine import deepspeed_config, lr_lambda

    train = load_config(ROOT / "configs/demo.yaml", ["train.grad_accum=2", "train.precision=fp16"]).train
    ds = deepspeed_config(train, world_size=4)
    assert ds["train_batch_size"] == train.micro_batch_size * 2 * 4
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == train.lr
    train = load_config(ROOT / "configs/demo.yaml", [f"train.deepspeed_config={ROOT / 'configs/ds_zero3.json'}"]).train
    ds = deepspeed_config(train, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["contiguous_gradients"]
    # warmup then cosine down to min_lr_ratio
    factor = lr_lambda(train)
    assert factor(0) == pytest.approx(1 / train.warmup_steps)
    assert factor(train.warmup_steps) == pytest.approx(1.0)
    assert factor(train.steps) == pytest.approx(train.min_lr_ratio)
