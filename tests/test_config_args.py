"""common.config_args: one flag grammar from a config dataclass, help with each default once, and
the layers below the flags (a TOML file, then environment variables)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from common.cli import UserError
from common.config_args import (ArgumentParser, add_config_arguments, apply_layers,
                                config_from_args, config_values, env_values, find_config_file)


@dataclass
class Demo:
    lr: float = field(default=5e-3, metadata={"help": "the learning rate"})
    epochs: int = field(default=3, metadata={"help": "epochs", "aliases": ("--ep",)})
    augment: bool = field(default=True, metadata={"help": "augment the images"})
    mode: str = field(default="multi", metadata={"help": "task mode", "choices": ("multi", "single")})
    sizes: tuple[int, ...] = field(default=(160, 240), metadata={"help": "sizes"})
    betas: tuple[float, float] = field(default=(0.9, 0.99), metadata={"help": "Adam betas"})
    cap: int | None = field(default=None, metadata={"help": "a cap", "default_help": "no cap"})
    where: str = field(default="", metadata={"help": "the place", "required": True})
    hidden: str = field(default="x", metadata={"cli": False})


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="demo")
    add_config_arguments(p, Demo)
    return p


def test_one_spelling_and_only_given_values():
    args = parser().parse_args(["--lr", "1e-3", "--no-augment", "--sizes", "32,48",
                                "--betas", "0.8,0.9", "--ep", "7", "--mode", "single"])
    assert config_values(args, Demo) == {"lr": 1e-3, "augment": False, "sizes": (32, 48),
                                         "betas": (0.8, 0.9), "epochs": 7, "mode": "single"}
    cfg = config_from_args(args, Demo, where="here")
    assert cfg == Demo(lr=1e-3, epochs=7, augment=False, mode="single", sizes=(32, 48),
                       betas=(0.8, 0.9), where="here")
    assert config_values(parser().parse_args([]), Demo) == {}   # defaults stay the dataclass's
    base = Demo(epochs=9)
    assert config_from_args(parser().parse_args(["--augment"]), Demo, base=base) == \
        dataclasses.replace(base, augment=True)


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--sizes", "32,x"], "argument --sizes: 'x' is not an integer"),
    (["--betas", "0.9"], "expected 2 comma-separated values"),
    (["--mode", "both"], "invalid choice: 'both'"),
    (["--augment", "false"], "unrecognized arguments: false"),    # one spelling: --no-augment
    (["--hidden", "y"], "unrecognized arguments"),
])
def test_bad_flags_are_user_errors(argv, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        parser().parse_args(argv)


def test_help_shows_each_default_once_and_marks_required(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: 0.005)") == 1 and "(default: None)" not in text
    assert "--augment, --no-augment" in text and "(default: on)" in text
    assert "(default: 160,240)" in text and "(default: no cap)" in text
    assert "the place (required)" in text and "(default: multi)" in text


def test_layers_file_then_environment_then_flags(tmp_path):
    p = parser()
    apply_layers(p, [("cxr.toml", {"lr": 0.1, "epochs": 4, "augment": False, "sizes": [32, 40],
                                   "mode": "single", "where": "file"}),
                     ("DEMO_EPOCHS", {"epochs": "5"}), ("DEMO_AUGMENT", {"augment": "true"})])
    args = p.parse_args(["--where", "flag"])
    assert config_from_args(args, Demo) == Demo(lr=0.1, epochs=5, augment=True, mode="single",
                                                sizes=(32, 40), where="flag")
    with pytest.raises(UserError, match=r"cxr.toml: unknown setting 'lrr'"):
        apply_layers(parser(), [("cxr.toml", {"lrr": 1})])
    with pytest.raises(UserError, match=r"DEMO_EPOCHS: epochs: 'five' is not an integer"):
        apply_layers(parser(), [("DEMO_EPOCHS", {"epochs": "five"})])
    with pytest.raises(UserError, match=r"cxr.toml: mode: 'both' is not one of multi, single"):
        apply_layers(parser(), [("cxr.toml", {"mode": "both"})])
    assert env_values("DEMO_", {"DEMO_LR_HEAD": "1", "OTHER": "2"}) == {"lr-head": "1"}
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cxr.toml").write_text("")
    assert find_config_file("cxr.toml", str(tmp_path / "a" / "b")) == str(tmp_path / "cxr.toml")
    assert find_config_file("nothing-here.toml", str(tmp_path / "a")) is None


def test_train_config_flags_have_help_and_one_bool_spelling(capsys):
    from trainer.config import TrainConfig
    p = ArgumentParser(prog="t")
    names = add_config_arguments(p, TrainConfig)
    assert "lr_head" in names and "augment" in names
    for f in dataclasses.fields(TrainConfig):
        if f.name in names:
            assert str(f.metadata.get("help", "")).strip(), f"TrainConfig.{f.name} has no help"
    args = p.parse_args(["--no-augment", "--lr-head", "0.001"])
    cfg = config_from_args(args, TrainConfig)
    assert cfg.augment is False and cfg.lr_head == 0.001
