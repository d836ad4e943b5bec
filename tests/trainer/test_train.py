"""Pretraining with Ray Train on a local cluster (CPU, gloo): 2 DDP workers stream their share of an
EPhys/OPhys mixture; loss falls; TensorBoard reads back; a stopped run resumes on the very next batch;
a killed worker is replaced and training continues from the checkpoint on the batches an
uninterrupted run sees; bad input fails before any worker starts."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest
import torch
import yaml

from shards.stream.dataset import MixtureStream
from shards.stream.loader import StreamLoader
from tests.support.storegen import make_store, uneven_records
from trainer import testhooks
from trainer.config import TrainConfig, parse_args
from trainer.testhooks import batch_digest
from trainer.train import main, run

pytestmark = pytest.mark.slow

TB_TAGS = ["train/loss", "train/loss/ephys", "train/loss/ophys", "train/acc/ephys/static_gratings",
           "train/acc/ophys/natural_scenes", "train/lr", "perf/data_wait_fraction", "perf/samples_per_s",
           "perf/tokens_per_s", "val/score", "val/acc/ephys/static_gratings", "val/acc/ophys/drifting_gratings"]


@pytest.fixture(scope="module", autouse=True)
def fast_reports():
    old = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old or "0.1"  # ray.train.report waits for this poll
    yield
    if old is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)


@pytest.fixture(scope="module", autouse=True)
def record_batches():
    """Every run here writes RUN/batches/rank{r}.jsonl (a test hook: trainer.testhooks)."""
    with testhooks.enabled(record_batches=True):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("train") / "store"), uneven_records())


def config(store, out, **kw) -> TrainConfig:
    """2 workers, small model, 160-window epochs of batch 8 per worker: 10 steps per epoch."""
    base = dict(shards=store.uri, out=str(out), mix="ephys=1,ophys=1", preset="small", batch_size=8,
                epoch_windows=160, workers=2, cpus_per_worker=0.5, loader_workers=0, log_every=4, report_every=4,
                early_stop_patience=0)
    base.update(kw)
    return TrainConfig(**base)


def recorded(out) -> dict[int, dict[int, dict]]:
    """{rank: {step: the last record of that step}} from RUN/batches (a restart rewrites steps)."""
    res: dict[int, dict[int, dict]] = defaultdict(dict)
    for rank in (0, 1):
        with open(os.path.join(out, "batches", f"rank{rank}.jsonl")) as fh:
            for line in fh:
                r = json.loads(line)
                res[rank][r["step"]] = r
    return res


def uninterrupted(cfg: TrainConfig, steps: int) -> dict[int, dict[int, int]]:
    """{rank: {step: batch_digest}} of the batches an uninterrupted run trains on: the stream itself."""
    res = {}
    for rank in range(cfg.world_size):
        loader = StreamLoader(MixtureStream(cfg.stream_config("train"), rank=rank, world_size=cfg.world_size),
                              num_workers=0)
        digests, step = {}, 0
        while step < steps:
            for batch in loader:
                step += 1
                digests[step] = batch_digest(batch)
                if step == steps:
                    break
        res[rank] = digests
    return res


def read_tb(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def resumed_run(ray_cluster, store, tmp_path_factory):
    """A 24-step run stopped (as if preempted) at step 7, then continued with --resume."""
    out = tmp_path_factory.mktemp("pre") / "run"
    with testhooks.enabled(record_batches=True, stop_at_step=7):
        first = run(config(store, out, max_steps=24))
    after_stop = recorded(out)
    second = run(config(store, out, max_steps=24, resume=True))
    return out, first, after_stop, second


def test_two_workers_loss_falls_and_tensorboard_has_both_modalities(resumed_run):
    out, _, _, metrics = resumed_run
    assert metrics["status"] == "finished" and metrics["step"] == 24
    tb = read_tb(str(out / "tb"))
    tags = tb.Tags()["scalars"]
    for tag in TB_TAGS:
        assert tag in tags, tag
    loss = [e.value for e in tb.Scalars("train/loss")]  # steps 1, 4, 8, ... (labels are random: the fall is
    assert loss[0] - sum(loss[len(loss) // 2:]) / len(loss[len(loss) // 2:]) > 0.2, loss  # to the label prior)
    steps = [e.step for e in tb.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one curve across the stop and the resume
    wait = [e.value for e in tb.Scalars("perf/data_wait_fraction")]
    assert all(0 <= w <= 1 for w in wait)
    lr = [e.value for e in tb.Scalars("train/lr")]
    # small preset: AdamW, square-root batch rule from 1e-3 at batch 32 (global batch 16 here)
    assert lr[0] == pytest.approx(3.125e-5 * 16 * (16 / 32) ** 0.5) and lr[-1] < lr[0] / 10  # held, then cosine decay
    assert "val/confusion/static_gratings" in tb.Tags()["images"]
    # validation per task per modality (and per session) in metrics.json, config.yaml resolved
    final = metrics["final"]
    assert set(final["modality"]) == {"ephys", "ophys"}
    assert {"static_gratings", "natural_scenes"} <= set(final["modality"]["ophys"]["tasks"])
    assert {"e1", "o1"} <= {e["session"] for e in final["record"].values()}  # long enough for a validation split
    assert all(name == f"{e['session']}/{e['region']}" for name, e in final["record"].items())  # one per record
    assert final["score"] == pytest.approx((final["modality"]["ephys"]["score"]
                                            + final["modality"]["ophys"]["score"]) / 2)
    doc = yaml.safe_load(open(out / "config.yaml"))
    assert doc["resolved"]["lr"] == pytest.approx(lr[0]) and doc["resolved"]["total_steps"] == 24
    assert os.path.exists(out / "model_best.pt") and metrics["best"]["step"] in (10, 20, 24)


def test_resume_after_a_stop_continues_with_the_same_next_batch(resumed_run, store):
    out, first, after_stop, _ = resumed_run
    assert first["status"] == "stopped" and first["step"] == 7
    assert all(max(steps) == 7 for steps in after_stop.values())
    rec = recorded(out)
    want = uninterrupted(config(store, out), 24)
    for rank in (0, 1):
        assert sorted(rec[rank]) == list(range(1, 25))
        assert rec[rank][8]["start_step"] == 7  # trained by the resumed run
        assert {s: r["digest"] for s, r in rec[rank].items()} == want[rank]
        assert rec[rank][8]["position"] == 7 * 16 + rank * 8  # global window 112 (+ rank's offset)
    log = open(out / "train.log").read()
    assert "resumed from the checkpoint at step 7" in log


def test_killed_worker_restarts_from_checkpoint_on_the_same_batches(ray_cluster, store, tmp_path):
    out = tmp_path / "run"
    with testhooks.enabled(record_batches=True, fail_at_step=6):
        metrics = run(config(store, out, max_steps=12))
    assert metrics["status"] == "finished" and metrics["step"] == 12
    rec = recorded(out)
    want = uninterrupted(config(store, out), 12)
    for rank in (0, 1):
        assert [rec[rank][s]["start_step"] for s in range(5, 13)] == [4] * 8  # redone after the restart
        assert {s: r["digest"] for s, r in rec[rank].items()} == want[rank]
    log = open(out / "train.log").read()
    assert "injected failure: rank 1 exits at step 6" in log
    assert "worker failure" in log and "restarts the workers from the latest checkpoint" in log
    assert "resumed from the checkpoint at step 4" in log


# ---- bad input: a clear error before any worker starts ------------------------------------------------

def test_mix_that_matches_nothing_fails_before_training(store, tmp_path):
    with pytest.raises(ValueError, match="'ophys/VISrl' matches no shard"):
        run(config(store, tmp_path / "r", mix="ephys=1,ophys/VISrl=1", max_steps=2))
    assert not (tmp_path / "r").exists()


def test_missing_store_is_a_clear_error_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: .*manifest.parquet: missing"):
        main(["--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--workers", "0"])


def test_resume_with_another_model_variant_names_both(resumed_run, store):
    out = resumed_run[0]
    with pytest.raises(ValueError, match="holds a 'main' model, but this run builds 'common-ca'"):
        run(config(store, out, max_steps=30, resume=True, model="common-ca"))
    with pytest.raises(ValueError, match="already holds a run"):
        run(config(store, out, max_steps=30))


def test_resume_without_checkpoint_is_an_error(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(config(store, tmp_path / "r", resume=True, max_steps=2))


# ---- config: defaults < YAML < flags; --help shows defaults ------------------------------------------

def test_yaml_then_flags_override_defaults(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 16\nmix: ephys=1\nmodel_overrides: {dim: 64}\nsessions_exclude: a,b\n")
    cfg = parse_args(["--config", str(path), "--mix", "ophys=1", "--model-override", "depth=3", "--no-bf16"])
    assert (cfg.batch_size, cfg.mix, cfg.bf16, cfg.sessions_exclude) == (16, "ophys=1", False, ["a", "b"])
    assert cfg.model_overrides == {"dim": 64, "depth": 3}
    assert cfg.model_config().dim == 64 and cfg.weight_decay == 1e-4
    assert TrainConfig(workers=4).peak_lr == pytest.approx(3.125e-5 * 32 * 4)  # LAMB (paper preset): linear rule
    small = TrainConfig(workers=4, preset="small")
    assert small.optimizer_name == "adamw" and small.peak_lr == pytest.approx(5e-4 * 2)  # AdamW: sqrt(128 / 32)
    assert TrainConfig(workers=4, preset="small", optimizer="lamb").peak_lr == pytest.approx(3.125e-5 * 32 * 4)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "3.125e-05" in help_text and "--max-steps" in help_text and "(default: 300)" in help_text


def test_local_mode_checkpoint_holds_everything_and_loads_weights_only(store, tmp_path):
    """workers=0 runs the loop in this process (fast); the model file loads with weights_only=True."""
    from trainer.checkpoint import load_model_file

    with testhooks.enabled():  # no hooks
        metrics = run(config(store, tmp_path / "r", workers=0, max_steps=3))
    assert metrics["status"] == "finished"
    ck = load_model_file(str(tmp_path / "r" / "model_last.pt"))
    assert ck["meta"]["variant"] == "main" and ck["n_sessions"] == 4
    assert isinstance(ck["state_dict"]["unit_emb.weight"], torch.Tensor)


def test_tally_counts_accuracy_and_r2_per_modality_and_session_and_skips_padding():
    from trainer.model.config import TaskSpec
    from trainer.tally import Tally

    tasks = (TaskSpec("cls", 3), TaskSpec("reg", 2, kind="regression"))
    batch = {"modality": torch.tensor([0, 1, 1]), "session_index": torch.tensor([0, 1, 1]),
             "input_cu_seqlens": torch.tensor([0, 2, 3, 5], dtype=torch.int32),
             "output_cu_seqlens": torch.tensor([0, 2, 4, 5], dtype=torch.int32),
             "output_task_index": torch.tensor([0, 1, 0, 1, 0]),
             "output_labels": torch.tensor([2, -1, 0, -1, 1]),
             "output_values": torch.tensor([[0., 0.], [1., 3.], [0., 0.], [2., 4.], [0., 0.]]),
             "output_weights": torch.tensor([1., 1., 1., 1., 0.])}  # the last query: a padding window
    out = {"query_index": {"cls": torch.tensor([0, 2, 4]), "reg": torch.tensor([1, 3])},
           "logits": {"cls": torch.tensor([[0., 0., 5.], [0., 5., 0.], [0., 5., 0.]]),  # right, wrong, (padding)
                      "reg": torch.tensor([[1., 3.], [2., 0.]])}}
    t = Tally(tasks, ["s0", "s1"], confusion=True)
    t.add(out, batch)
    s = t.summary()
    assert s["modality"]["ephys"]["tasks"]["cls"] == pytest.approx({"n": 1, "acc": 1.0, "loss": s["modality"]["ephys"]
                                                                    ["tasks"]["cls"]["loss"]})
    assert s["modality"]["ophys"]["tasks"]["cls"]["acc"] == 0.0 and s["modality"]["ophys"]["tasks"]["cls"]["n"] == 1
    # R² about the mean of the task's target elements: exact -> 1; y (2, 4) predicted (2, 0): 1 - 16 / 2
    assert s["session"]["s0"]["tasks"]["reg"]["r2"] == pytest.approx(1.0)
    assert s["modality"]["ophys"]["tasks"]["reg"]["r2"] == pytest.approx(1 - 16 / (20 - 36 / 2))
    assert s["score"] == pytest.approx((1.0 + 0.0) / 2)  # mean of the modalities' classification accuracy
    assert t.confusion_matrices()["cls"]["ephys"][2, 2] == 1 and t.confusion_matrices()["cls"]["ophys"].sum() == 1
