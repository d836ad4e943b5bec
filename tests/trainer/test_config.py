"""Config values are checked against their annotations; each bad one is one line (issue 13.7)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Optional

import pytest
import yaml

from tests.support import REPO
from trainer.config import TrainConfig, check_value, parse_args
from trainer.strict_yaml import StrictDumper, StrictLoader
from trainer.typecheck import ConfigError, Mismatch, coerce

CLI = [  # (YAML text, what the line must name): the cases, through `python -m trainer.train`
    ('resume: "no"\n', ["resume", "'no'", "true or false"]),
    ("lr: [1, 2]\n", ["lr", "[1, 2]", "a number"]),
    ('batch_size: "lots"\n', ["batch_size", "'lots'", "an integer"]),
    ("lrr: 0.1\n", ["unknown config key 'lrr'", "did you mean 'lr'"]),
]
IN_PROCESS = [  # the same checks through trainer.train.main (the CLI's function), without a process each
    ("resume: no\n", ["resume", "'no'", "true or false"]),  # YAML 1.1's "no" is not a bool here either
    ("epochs: true\n", ["epochs", "True", "an integer"]),
    ("batch_size: 0\n", ["batch_size", "0", ">= 1"]),
    ("model_overrides: {no_such_field: 1}\n", ["model_overrides", "no_such_field"]),
    ("model_overrides: {window_s: 2.0}\n", ["model_overrides", "window_s is set by the run's own field"]),
    ("batch_size: [\n", ["not valid YAML", "line"]),
    ("- a\n- b\n", ["expected a mapping"]),
]


def _train(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "trainer.train", "--shards", str(tmp_path / "no-store"),
                             "--workers", "0", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _one_line(proc) -> str:
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode not in (0, None), (out, err)
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_each_bad_config_value_is_one_line_naming_field_value_and_file(tmp_path):
    procs = []
    for i, (text, _) in enumerate(CLI):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        procs.append((path, _train(tmp_path, "--config", str(path), "--out", str(tmp_path / f"run{i}"))))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    procs.append((None, _train(tmp_path, "--out", str(a_file))))
    for (path, proc), (_, needles) in zip(procs, CLI + [(None, ["out", "a-file", "is a file"])]):
        line = _one_line(proc)
        assert line.startswith("error: "), line
        if path is not None:
            assert str(path) in line, line
        for needle in needles:
            assert needle in line, (needle, line)


def test_more_bad_values_through_main(tmp_path):
    from trainer.train import main

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = []
    for i, (text, needles) in enumerate(IN_PROCESS):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        cases.append((["--config", str(path), "--out", str(tmp_path / f"run{i}")], [str(path), *needles]))
    cases.append((["--out", str(a_file / "run")], ["out", "a-file", "is a file"]))
    cases.append((["--config", str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "r")],
                  ["absent.yaml", "no such file"]))
    for args, needles in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--shards", str(tmp_path / "no-store"), "--workers", "0", *args])
        line = str(exc.value.code)
        assert line.startswith("error: ") and "\n" not in line, line
        for needle in needles:
            assert needle in line, (needle, line)
    assert not any(p.name.startswith("run") for p in tmp_path.iterdir())  # nothing was started


def test_flags_are_named_as_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line \(--model-override\): 'dim'"):
        parse_args(["--model-override", "dim"])
    path = tmp_path / "ok.yaml"
    path.write_text("batch_size: 16\nweight_decay: 1e-4\nresume: false\nlr: 1\nuse_gpu: null\n")
    cfg = parse_args(["--config", str(path), "--epochs", "3"])
    assert (cfg.batch_size, cfg.weight_decay, cfg.resume, cfg.lr, cfg.use_gpu) == (16, 1e-4, False, 1.0, None)
    assert isinstance(cfg.lr, float) and cfg.epochs == 3
    cfg = parse_args(["--config", str(path), "--batch-size", "0", "--shards", "s", "--out", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match=r"command line \(--batch-size\): batch_size = 0: must be >= 1"):
        cfg.absolute().validate()
    cfg = parse_args(["--embed-lr-scale", "0", "--shards", "s", "--out", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match=r"embed_lr_scale = 0.0: must be > 0"):
        cfg.absolute().validate()
    for bad in ("0", "1.5"):
        cfg = parse_args(["--train-fraction", bad, "--shards", "s", "--out", str(tmp_path / "r")])
        with pytest.raises(ConfigError, match=r"command line \(--train-fraction\): train_fraction = .*: must be in \(0, 1\]"):
            cfg.absolute().validate()


def test_check_value_follows_the_annotation():
    assert check_value("epoch_windows", None) is None and check_value("epoch_windows", 5) == 5
    assert check_value("use_gpu", None) is None and check_value("use_gpu", True) is True
    assert check_value("sessions_exclude", "a, b,") == ["a", "b"]
    for name, value in [("use_gpu", "true"), ("use_gpu", 1), ("epoch_windows", 2.5), ("sessions_include", [1]),
                        ("mix", 3), ("model_overrides", "dim=3"), ("window_s", True)]:
        with pytest.raises(ConfigError, match=f"x.yaml: {name} = "):
            check_value(name, value, "x.yaml")
    # the general rules, for annotations TrainConfig does not use (yet)
    assert coerce([1, 2], tuple[int, ...]) == (1, 2) and coerce([1, "a"], tuple[int, str]) == (1, "a")
    assert coerce(None, Optional[tuple[float, float]]) is None and coerce([1, 2], tuple[float, float]) == (1.0, 2.0)  # noqa: UP045 (the Optional spelling must coerce too)
    for value, t in [([1, 2, 3], tuple[int, int]), ([True], tuple[int, ...]), ({"a": 1}, dict[str, str])]:
        with pytest.raises(Mismatch):
            coerce(value, t)


def test_written_config_reads_back_identically(tmp_path):
    cfg = TrainConfig(shards="s", out="o", sessions_include=["1e5", "yes", "715093703"], mix="ephys=1")
    text = yaml.dump(cfg.to_dict(), Dumper=StrictDumper, sort_keys=False)
    assert TrainConfig.from_dict(yaml.load(text, Loader=StrictLoader)) == cfg
    assert yaml.safe_load(text)["sessions_include"] == ["1e5", "yes", "715093703"]  # and for YAML 1.1 readers


@pytest.mark.parametrize("module", ["trainer.train", "trainer.finetune"])
def test_help_shows_only_user_settings(module, capsys):
    """The test hooks (fault injection, batch records) are no flags: trainer.testhooks, an environment variable."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--max-steps" in text and "--resume" in text
    for hook in ("fail-at-step", "stop-at-step", "record-batches", "fail_at_step", "stop_at_step", "record_batches",
                 "fault injection", "fingerprint", "test hook"):
        assert hook not in text, hook


def test_test_hooks_come_from_the_environment_only(monkeypatch):
    from trainer import testhooks

    monkeypatch.delenv(testhooks.ENV, raising=False)
    assert testhooks.from_env() == testhooks.TestHooks() and testhooks.worker_env() == {}
    with testhooks.enabled(stop_at_step=3):
        assert testhooks.from_env() == testhooks.TestHooks(stop_at_step=3)
        assert set(testhooks.worker_env()) == {testhooks.ENV}
    assert testhooks.ENV not in os.environ
    monkeypatch.setenv(testhooks.ENV, '{"stop_at_stpe": 3}')
    with pytest.raises(ValueError, match="stop_at_stpe"):
        testhooks.from_env()
    assert not {"fail_at_step", "stop_at_step", "record_batches"} & set(TrainConfig().to_dict())


def test_config_yaml_of_an_earlier_run_still_reads(tmp_path):
    """Runs made when the test hooks were fields wrote them (off) into RUN/config.yaml."""
    path = tmp_path / "config.yaml"
    path.write_text("batch_size: 16\nrecord_batches: false\nfail_at_step: null\nstop_at_step: null\n")
    assert parse_args(["--config", str(path)]).batch_size == 16
    path.write_text("stop_at_step: 7\n")
    with pytest.raises(ConfigError, match="stop_at_step is no setting"):
        parse_args(["--config", str(path)])


def test_train_fraction_reaches_the_train_plan():
    cfg = TrainConfig(shards="s", train_fraction=0.25)
    assert cfg.stream_config("train").plan_config().train_fraction == 0.25


def test_unit_dropout_off_reaches_the_train_stream_and_on_leaves_it_to_the_split():
    """``--no-unit-dropout`` turns the augmentation off in training; on (default) it stays off outside training."""
    off = parse_args(["--shards", "s", "--no-unit-dropout"])
    assert off.unit_dropout is False and off.stream_config("train").unit_dropout is False
    on = TrainConfig(shards="s")
    assert on.stream_config("train").unit_dropout is None  # None: on for the train split only (StreamConfig)
