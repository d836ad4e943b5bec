"""Checkpoints and --resume in Ray Train's local mode (``--workers 0``), which persists no reported
checkpoint: the loop writes RUN/ray/checkpoint_XXXXXXXX itself (with a checksum), Ctrl-C checkpoints
and stops in one line, --resume continues on exactly the next batch, an --out with an earlier run is
refused, and a corrupt newest checkpoint falls back to the newest valid one (issue 13, items 2 and 3)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.support.storegen import make_store, uneven_records
from tests.trainer.test_train import uninterrupted
from trainer import testhooks
from trainer.checkpoint import CHECKSUM_FILE, STATE_FILE, check_checkpoint, checkpoint_step, list_checkpoints
from trainer.config import TrainConfig
from trainer.train import main, run

pytestmark = pytest.mark.slow

from tests.support import REPO  # noqa: E402

STEPS = 60  # 3 epochs of 20 steps (160 windows, batch 8, one worker)
SIGNAL_AT = 10  # Ctrl-C once train.log shows this step


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("resume") / "store"), uneven_records())


FLAGS = dict(workers=0, mix="ephys=1,ophys=1", preset="small", batch_size=8, epoch_windows=160, max_steps=STEPS,
             log_every=2, report_every=4, early_stop_patience=0, loader_workers=0, val_batches=2)


@pytest.fixture(scope="module", autouse=True)
def record_batches():
    """Every run here (in this process or a subprocess) writes RUN/batches/rank0.jsonl (trainer.testhooks)."""
    with testhooks.enabled(record_batches=True):
        yield


def config(store, out, **kw) -> TrainConfig:
    return TrainConfig(shards=store.uri, out=str(out), **{**FLAGS, **kw})


def cli(store, out, *extra) -> list[str]:
    args = ["--shards", store.uri, "--out", str(out)]
    for k, v in FLAGS.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return args + list(extra)


def recorded(out) -> dict[int, dict]:
    """{step: the last record of that step} of the one rank (a resume may redo steps)."""
    res = {}
    with open(os.path.join(out, "batches", "rank0.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            res[r["step"]] = r
    return res


@pytest.fixture(scope="module")
def interrupted(store, tmp_path_factory):
    """`python -m trainer.train --workers 0 ...`, SIGINT once train.log shows step SIGNAL_AT."""
    out = tmp_path_factory.mktemp("ctrl-c") / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           testhooks.ENV: '{"record_batches": true}'}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *cli(store, out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    try:  # no clock: a run that never logs the step ends by itself (STEPS steps), and that fails here
        while f"step {SIGNAL_AT}/{STEPS} " not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, proc.returncode, stdout, stderr, recorded(out)


@pytest.fixture(scope="module")
def resumed(interrupted, store):
    out = interrupted[0]
    return out, run(config(store, out, resume=True))


def stopped_step(stderr: str) -> int:
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted at step ") and line.endswith("; resume with --resume"), stderr
    return int(line.split()[3].rstrip(";"))


def test_ctrl_c_in_local_mode_checkpoints_and_ends_in_one_line(interrupted):
    out, rc, stdout, stderr, rec = interrupted
    assert "Traceback" not in stderr and "Traceback" not in stdout and "KeyboardInterrupt" not in stderr
    n = stopped_step(stderr)
    assert stderr.strip().splitlines() == [f"interrupted at step {n}; resume with --resume"], stderr
    assert rc == 130
    assert SIGNAL_AT <= n < STEPS and max(rec) == n  # stopped between two steps, right after the signal
    newest = list_checkpoints(str(out))[0]  # RUN/ray/checkpoint_XXXXXXXX, as Ray lays them out
    assert os.path.basename(newest) == f"checkpoint_{n:08d}" and checkpoint_step(newest) == n
    assert os.path.exists(os.path.join(newest, CHECKSUM_FILE)) and check_checkpoint(newest) is None
    assert json.load(open(out / "metrics.json"))["status"] == "interrupted"
    assert not (out / ".interrupt").exists()


def test_resume_after_ctrl_c_continues_on_exactly_the_next_batch(interrupted, resumed, store):
    _, _, _, stderr, _ = interrupted
    out, metrics = resumed
    n = stopped_step(stderr)
    assert metrics["status"] == "finished" and metrics["step"] == STEPS
    rec = recorded(out)
    assert sorted(rec) == list(range(1, STEPS + 1))
    assert rec[n + 1]["start_step"] == n and rec[n]["start_step"] == 0  # nothing redone, nothing skipped
    assert rec[n + 1]["position"] == (n % 20) * 8  # the epoch's next global window
    assert {s: r["digest"] for s, r in rec.items()} == uninterrupted(config(store, out), STEPS)[0]
    assert f"resumed from the checkpoint at step {n} " in open(out / "train.log").read()
    assert [checkpoint_step(d) for d in list_checkpoints(str(out))] == [STEPS, STEPS - 4]  # keep_checkpoints


def test_second_run_into_the_same_out_is_refused_in_one_line(resumed, store):
    out, _ = resumed
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "model_best.pt", "model_last.pt")}
    with pytest.raises(SystemExit) as exc:
        main(cli(store, out))
    msg = str(exc.value.code)
    assert "\n" not in msg and msg.startswith(f"error: {out} already holds a run") and "--resume" in msg, msg
    assert {name: (out / name).read_bytes() for name in before} == before


def test_truncated_newest_checkpoint_falls_back_to_the_previous_with_a_warning(resumed, store, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(resumed[0], out)
    newest, previous = list_checkpoints(str(out))
    bad = os.path.join(newest, STATE_FILE)
    os.truncate(bad, 20000)
    capsys.readouterr()
    metrics = run(config(store, out, resume=True))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and bad in warnings[0] and "checksum mismatch" in warnings[0], err
    assert "Traceback" not in err
    k = checkpoint_step(previous)
    assert metrics["status"] == "finished" and metrics["step"] == STEPS
    log = open(out / "train.log").read()
    assert f"resumed from the checkpoint at step {k} " in log and bad in log
    rec = recorded(out)
    assert rec[k + 1]["start_step"] == k  # the steps after the valid checkpoint, trained again...
    assert {s: r["digest"] for s, r in rec.items()} == uninterrupted(config(store, out), STEPS)[0]  # ...the same
    assert check_checkpoint(newest) is None  # rewritten whole


def test_no_valid_checkpoint_is_one_line(resumed, store, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(resumed[0], out)
    dirs = list_checkpoints(str(out))
    for d in dirs:
        os.truncate(os.path.join(d, STATE_FILE), 20000)
    with pytest.raises(SystemExit) as exc:
        main(cli(store, out, "--resume"))
    msg = str(exc.value.code)
    assert "\n" not in msg and msg.startswith(f"error: --resume: no valid checkpoint under {out / 'ray'}"), msg
    assert all(os.path.join(d, STATE_FILE) in msg for d in dirs), msg


def test_checksum_catches_a_flipped_byte_and_checkpoints_without_one_still_load(resumed, tmp_path):
    ck = tmp_path / "checkpoint_00000007"
    shutil.copytree(list_checkpoints(str(resumed[0]))[0], ck)
    assert check_checkpoint(str(ck)) is None
    state = ck / STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off: torch may well load it, the checksum does not
    state.write_bytes(bytes(data))
    assert "checksum mismatch" in check_checkpoint(str(ck))
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    (ck / CHECKSUM_FILE).unlink()  # an older version's checkpoint: valid when it loads
    assert check_checkpoint(str(ck)) is None
    os.truncate(state, 20000)
    assert "unreadable" in check_checkpoint(str(ck))
