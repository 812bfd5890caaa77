"""``training.options``: one option system for both trainers (flags, YAML, JSON; did-you-mean)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest
import yaml

import classification.config as cls_config
import pretrain as pre_config
import training.options as options
from training.options import Options, add_arguments, canonical_keys, coerce_value, did_you_mean, given_flags, option

# (the trainer's make_config as f(values, file), config_from_args as f(argv), options that differ from the defaults)
TRAINERS = {
    "pretrain": (
        lambda values=None, path=None: pre_config.make_config(values, path),
        lambda p: pre_config.add_arguments(p),
        lambda args: pre_config.config_from_args(args),
        {"data": "imgs", "output": "out", "mask_ratio": 0.5, "decoder_depth": 2, "encoder_mask_tokens": True,
         "model_kwargs": {"depth": 3}, "clip_grad": 3.0, "masking": "block", "tensorboard": False},
    ),
    "finetune": (
        lambda values=None, path=None: cls_config.make_config("finetune", values, path),
        lambda p: cls_config.add_arguments(p, "finetune"),
        lambda args: cls_config.config_from_args(args, "finetune"),
        {"data": "ds", "output": "out", "checkpoint": "enc.safetensors", "tune_blocks": "2", "layer_decay": 0.75,
         "model_kwargs": {"depth": 6}, "mixup_mode": "pair", "epochs": 3, "progress": False},
    ),
}


def to_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_options_round_trip_through_flags_yaml_and_json(tmp_path, trainer):
    make, add, from_args, values = TRAINERS[trainer]
    cfg = make(values)
    for key, value in values.items():
        assert getattr(cfg, key) == value
    # the saved config.json / a YAML file of the whole config give the same config back
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert make(path=tmp_path / "c.json") == cfg
    assert make(path=tmp_path / "c.yaml") == cfg
    # the same values as flags (kebab-case, --no-x for false) give the same config
    parser = argparse.ArgumentParser()
    add(parser)
    assert from_args(parser.parse_args(to_argv(values))) == cfg
    # a flag wins over the file
    override = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--epochs", "7"])
    assert from_args(override).epochs == 7 and from_args(override).output == "out"


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_both_trainers_suggest_the_closest_key_through_the_one_implementation(tmp_path, monkeypatch, trainer):
    make, _, _, values = TRAINERS[trainer]
    (tmp_path / "bad.yaml").write_text("data: d\noutput: o\nbatch-sise: 4\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option 'batch-sise'; did you mean 'batch_size'\?"):
        make(path=tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match=r"options: unknown option 'epoch'; did you mean 'epochs'\?"):
        make({**values, "epoch": 2})
    with pytest.raises(ValueError, match=r"model_kwargs: 'dpeth' is not .*; did you mean 'depth'\?"):
        make({**values, "model_kwargs": {"dpeth": 2}})
    with pytest.raises(ValueError, match=r"precision: 'bf61' is not one of auto, fp32, bf16, fp16; did you mean"):
        make({**values, "precision": "bf61"})
    # every one of those messages is built by training.options.did_you_mean
    monkeypatch.setattr(options, "did_you_mean", lambda word, candidates: " <one place>")
    for bad in ({"epoch": 2}, {"model_kwargs": {"dpeth": 2}}, {"precision": "bf61"}):
        with pytest.raises(ValueError, match="<one place>"):
            make({**values, **bad})


def test_did_you_mean_and_key_spelling():
    assert did_you_mean("mask_ration", ["mask_ratio", "masking"]) == "; did you mean 'mask_ratio'?"
    assert did_you_mean("zzz", ["mask_ratio"]) == ""
    assert canonical_keys({"mask-ratio": 1}, "f", ["mask_ratio"]) == {"mask_ratio": 1}
    with pytest.raises(ValueError, match="f: 'mixup' is a fine-tuning option"):
        canonical_keys({"mixup": 1}, "f", ["epochs"], {"mixup": "a fine-tuning option"})


@pytest.mark.parametrize("value, kind, expected", [
    ("3", int, 3), (3, float, 3.0), ("0.5", float, 0.5), ('{"a": 1}', dict, {"a": 1}), (5, str, "5"),
    (True, bool, True), (None, int, None),
])
def test_coerce_value(value, kind, expected):
    assert coerce_value("x", value, kind) == expected


@pytest.mark.parametrize("value, kind, message", [
    (2.5, int, "x: expected an integer, got 2.5"), ("yes", bool, "x: expected true or false"),
    ("abc", float, "x: expected a number"), ("{", dict, "x: not valid JSON"),
])
def test_coerce_value_errors_name_the_option(value, kind, message):
    with pytest.raises(ValueError, match=message):
        coerce_value("x", value, kind)


@dataclass
class Toy(Options):
    TEXT_OPTIONS = {"extra": "JSON"}

    size: int = option("a size", default=2)
    mode: str = option("a mode", default="fast", choices=("fast", "slow"))
    rate: float = option("a rate (default: the recipe's)", default=None, type=float)
    extra: dict = option("more", default={})
    on: bool = option("a switch", default=True)


def test_options_base_builds_flags_checks_choices_and_ranges():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    help_text = parser.format_help()
    assert "--size SIZE" in help_text and "(default: 2)" in help_text and "--no-on" in help_text
    assert "--extra JSON" in help_text and "(default: {})" in help_text
    assert "rate (default: the recipe's)" in " ".join(help_text.split()) and "(default: None)" not in help_text
    args = parser.parse_args(["--size", "5", "--no-on", "--extra", '{"k": 1}'])
    given = given_flags(args, ["size", "on", "extra", "mode"])
    assert given == {"size": 5, "on": False, "extra": '{"k": 1}'}  # flags not typed stay absent
    values = Toy.gather([("options", given)])
    assert values == {"size": 5, "on": False, "extra": {"k": 1}}
    toy = Toy(**values)
    assert toy.changed(["size", "mode", "on"]) == ["size", "on"]
    with pytest.raises(ValueError, match="mode: 'slwo' is not one of fast, slow; did you mean 'slow'"):
        Toy(mode="slwo").check_choices()
    Toy(rate=None).check_ranges(not_negative=["rate"])  # None (the recipe's) is not checked
    with pytest.raises(ValueError, match="size must be at least 1, got 0"):
        Toy(size=0).check_ranges(at_least_one=["size"])
    assert Toy().extra is not Toy().extra  # a dict default is copied per instance
