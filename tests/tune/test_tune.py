"""Sweeps (python -m trainer.tune): a tiny sweep of 2 ratios x 1 seed on a synthetic store writes exactly
the expected rows, results.md and PNGs; restoring a sweep whose trial failed runs only that trial (from
its last stage); the held-out draw is deterministic and never pretrained on; `report` rebuilds the same
files from results.parquet; bad input is one line before any trial."""

from __future__ import annotations

import glob
import itertools
import json
import math
import os

import matplotlib.image
import pandas as pd
import pytest
import yaml

from shards.store import Store
from tests.support.storegen import ephys, make_store, ophys
from trainer.tune import report, results
from trainer.tune.cli import main
from trainer.tune.heldout import choose_heldout, heldout_ids, session_table
from trainer.tune.points import Point, grid_points, point_sessions
from trainer.tune.spec import load_spec
from trainer.tune.sweep import Resources, param_space, prepare, startup_trials, tune_config
from trainer.tune.trial import point_of, trial_score

REGIONS = ["VISp", "VISp", "VISl", "VISl"]
TINY = {"name": "tiny", "version": 1, "held_out": 1, "pretrain_steps": 6, "finetune_epochs": 1, "unfreeze_epoch": 0,
        "evaluate": ["ophys"],
        "train": {"batch_size": 8, "epoch_windows": 24, "loader_workers": 0, "log_every": 2, "val_batches": 2}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two regions x two sessions of each modality: one held out per region, one left to pretrain on."""
    recs = []
    for i, region in enumerate(REGIONS):
        recs.append(ephys(f"e{i}", region, 120.0, seed=10 + i, first_id=100 * (i + 1)))
        recs.append(ophys(f"o{i}", region, 120.0, seed=20 + i))
    return make_store(str(tmp_path_factory.mktemp("tune") / "store"), recs).uri


@pytest.fixture
def spec_file(tmp_path):
    def write(**changes):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**TINY, **changes}))
        return str(path)
    return write


def attempts(sweep, key: str) -> int:
    with open(os.path.join(sweep, "trials", key, "attempts.jsonl")) as fh:
        return len(fh.read().splitlines())


def pretraining_runs(sweep, key: str) -> int:
    """How many times the trial's pretraining started (trainer.train's loop logs one header per start)."""
    with open(os.path.join(sweep, "trials", key, "pretrain", "train.log")) as fh:
        return sum("steps per epoch" in line for line in fh)


def test_tiny_sweep_writes_results_and_a_restore_runs_only_the_missing_trial(store, spec_file, tmp_path, ray_cluster,
                                                                             monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    sweep = str(tmp_path / "sweep")
    spec = spec_file(finetune={"unit_prior": 0.3, "test_weights": "last"})
    args = ["--experiment", spec, "--ratios", "0,0.5", "--seeds", "0", "--shards", store, "--out", sweep,
            "--workers", "0", "--cpus-per-worker", "0.5", "--concurrent", "2", "--max-failures", "0"]
    mixed = Point(ratio=0.5, seed=0).key
    monkeypatch.setenv("NEUROMIX_TUNE_FAIL", mixed)  # fails once, after its pretraining
    with pytest.raises(SystemExit, match="1 trial\\(s\\) failed; rerun the same command"):
        main(args)
    first = pd.read_parquet(os.path.join(sweep, "results.parquet"))
    assert set(first.ratio) == {0.0}
    monkeypatch.delenv("NEUROMIX_TUNE_FAIL")

    summary = main(args)  # the same command: Tuner.restore, only the failed trial runs
    assert summary["restored"] and summary["finished"] == 2 and not summary["errors"]
    only_ophys = Point(ratio=0.0, seed=0).key
    assert attempts(sweep, only_ophys) == 1 and attempts(sweep, mixed) == 2
    assert pretraining_runs(sweep, only_ophys) == 1 and pretraining_runs(sweep, mixed) == 1  # retried from its stage
    for point in (only_ophys, mixed):  # the spec's finetune fields reach the finetunings, not the pretraining
        run = {stage: yaml.safe_load(open(os.path.join(sweep, "trials", point, stage, "config.yaml")))
               for stage in ("pretrain", "finetune_ophys")}
        assert run["finetune_ophys"]["unit_prior"] == 0.3 and run["finetune_ophys"]["test_weights"] == "last"
        assert run["pretrain"]["unit_prior"] == 0.0 and run["pretrain"]["test_weights"] == "best"

    df = pd.read_parquet(os.path.join(sweep, "results.parquet"))
    held = json.load(open(os.path.join(sweep, "heldout.json")))["sessions"]
    ophys_held = sorted(s for ids in held["ophys"].values() for s in ids)
    expected = {(r, s, t) for r in (0.0, 0.5) for s in ophys_held
                for t in ("static_gratings", "drifting_gratings", "natural_scenes")}
    assert len(df) == len(expected) == 12
    assert set(zip(df.ratio, df.session, df.task)) == expected
    for col in ("experiment", "ratio", "seed", "set_size", "variant", "ophys_regions", "ephys_regions", "session",
                "task", "modality", "accuracy", "trial_id"):
        assert col in df.columns
    assert set(df.modality) == {"ophys"} and set(df.experiment) == {"tiny"} and df.accuracy.between(0, 1).all()
    assert df.trial_id.nunique() == 2 and set(df[df.ratio == 0.5].mix) == {"ephys=0.5,ophys=0.5"}

    # what ASHA compares: each validation of the pretraining reported to Tune while the trial runs
    reports = [json.loads(line) for f in glob.glob(os.path.join(sweep, "tune", "*", "result.json"))
               for line in open(f) if line.strip()]
    during = [r for r in reports if r["stage"] == "pretrain"]
    assert during and all(math.isfinite(r["val_score"]) and r["validations"] >= 1 for r in during)

    md = open(os.path.join(sweep, "results.md")).read()
    assert "Static Gratings" in md and "OPhys all (r=0, n=all, main)" in md and " ± " in md
    pngs = {}
    for name in ("scaling.png", "transfer.png"):
        img = matplotlib.image.imread(os.path.join(sweep, name))
        assert img.shape[0] > 100 and img.shape[1] > 100
        pngs[name] = open(os.path.join(sweep, name), "rb").read()
    for point in (only_ophys, mixed):  # one TensorBoard hparams run per trial (its axes and test accuracy)
        events = b"".join(open(f, "rb").read() for f in glob.glob(os.path.join(sweep, "tb", point, "events.*")))
        assert b"_hparams_/session_start_info" in events and b"test/ophys/static_gratings" in events

    # report rebuilds the same files from results.parquet alone
    for name in ("results.md", *pngs):
        os.remove(os.path.join(sweep, name))
    assert main(["report", sweep]) == ["results.md", "scaling.png", "transfer.png"]
    assert open(os.path.join(sweep, "results.md")).read() == md
    for name, data in pngs.items():
        assert open(os.path.join(sweep, name), "rb").read() == data


def test_a_sweep_on_object_storage_keeps_results_and_tune_state_in_the_bucket_and_restores(store, spec_file, tmp_path,
                                                                                          ray_cluster, s3_bucket,
                                                                                          monkeypatch):
    """--out s3://...: Ray's storage_path and the sweep's files on the S3 server; only trial runs are local."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    out, work = f"s3://{s3_bucket}/sweeps/tiny", tmp_path / "work"
    args = ["--experiment", spec_file(), "--ratios", "0", "--seeds", "0", "--shards", store, "--out", out,
            "--work", str(work), "--workers", "0", "--cpus-per-worker", "0.5", "--concurrent", "1",
            "--max-failures", "0"]
    first = main(args)
    assert first["finished"] == 1 and not first["restored"] and first["hparams"] == 1
    bucket = Store(out)
    df = results.read(bucket)
    held = json.loads(bucket.read_bytes("heldout.json"))["sessions"]
    assert set(zip(df.session, df.task)) == {(s, t) for ids in held["ophys"].values() for s in ids
                                             for t in ("static_gratings", "drifting_gratings", "natural_scenes")}
    names = set(bucket.list())
    assert {"results.parquet", "results.md", "sweep.json", "heldout.json", "scaling.png"} <= names
    assert any(n.startswith("tune/") for n in names)  # Tune's experiment state: what a restore reads
    assert any(n.startswith("tb/") and "events." in n for n in names)
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:")
    again = main(args)  # the same command restores from the bucket; the finished trial does not run again
    assert again["restored"] and again["finished"] == 1
    assert pretraining_runs(str(work), Point(ratio=0.0, seed=0).key) == 1
    assert attempts(str(work), Point(ratio=0.0, seed=0).key) == 1
    assert results.read(bucket).equals(df)


def test_heldout_draw_is_deterministic_and_never_pretrained_on(store):
    table = session_table(store)
    a, b = choose_heldout(table, 1, seed=3), choose_heldout(table, 1, seed=3)
    assert a == b and set(a) == {"ephys", "ophys"} and all(len(v) == 1 for m in a.values() for v in m.values())
    assert {choose_heldout(table, 1, seed=s)["ophys"]["VISp"][0] for s in range(8)} == {"o0", "o1"}  # seeds differ
    held = set(heldout_ids(a))
    for point in (Point(ratio=0.5, seed=0), Point(ratio=0.0, seed=1, ophys_regions="VISp"),
                  Point(ratio=1.0, seed=0, set_size=1), Point(ratio=0.5, seed=0, ephys_regions="VISl+VISp")):
        sessions = point_sessions(point, table, a, heldout_seed=3)
        assert sessions and not held & set(sessions)
    assert point_sessions(Point(ratio=0.0, seed=0, ophys_regions="VISp"), table, a, 3) == sorted(
        {"o0", "o1"} - held)
    with pytest.raises(ValueError, match="VISl has 2 session\\(s\\) left to hold out, fewer than held_out=3"):
        choose_heldout(table, 3, seed=0, store="S")


def test_labels_that_name_no_area_get_no_held_out_session():
    """Every probe has grey / unknown channels: holding a session out for them would empty the EPhys pool."""
    rows = [(f"e{i}", "ephys", r) for i in range(4) for r in ("VISp", "VISl", "grey", "unknown")]
    rows += [(f"o{i}", "ophys", r) for i, r in enumerate(["VISp", "VISl", "VISp", "VISl"])]
    table = pd.DataFrame(rows, columns=["session_id", "modality", "region"])
    held = choose_heldout(table, 1, seed=0)
    assert set(held["ephys"]) == {"VISl", "VISp"} and set(held["ophys"]) == {"VISl", "VISp"}
    pool = {s for s, _, _ in rows if s.startswith("e")} - set(heldout_ids(held, "ephys"))
    assert len(pool) == 2  # two EPhys sessions left to pretrain on (none would be with grey and unknown held out)
    assert point_sessions(Point(ratio=1.0, seed=0), table, held, 0) == sorted(pool)


def test_a_trials_score_leaves_out_records_that_name_no_area():
    rows = [{"modality": "ophys", "region": "VISp", "accuracy": 0.4}, {"modality": "ophys", "region": "VISl",
            "accuracy": 0.2}, {"modality": "ophys", "region": "unknown", "accuracy": 1.0},
            {"modality": "ephys", "region": "VISp", "accuracy": 0.9}]
    assert trial_score(rows) == pytest.approx(0.3)  # OPhys areas only: not 0.533 with the unknown record
    assert trial_score([r for r in rows if r["modality"] == "ephys"]) == pytest.approx(0.9)


@pytest.mark.parametrize("flags, spec, message", [
    (["--ratios", "0,1.5"], {}, "ratios = \\[0.0, 1.5\\]: each ratio .* within \\[0, 1\\]"),
    (["--seeds", ""], {}, "command line \\(--seeds\\): seeds = \\[\\]: give at least one seed"),
    (["--variants", "main,tiny"], {}, "unknown variant 'tiny'"),
    (["--ophys-regions", "VISx"], {}, "ophys_regions: unknown region 'VISx'"),
    (["--held-out", "3"], {}, "fewer than held_out=3"),
    (["--search", "bayes", "--bayes-startup", "-1"], {}, "bayes_startup = -1: must be >= 0"),
    ([], {"ratio": [0.5]}, "spec.yaml: unknown key 'ratio' \\(did you mean 'ratios'\\?\\)"),
    ([], {"seeds": "0"}, "spec.yaml: seeds = '0': expected a list of integers"),
    ([], {"variants": ["main", "common_ca"]}, "spec.yaml: variants = .*unknown variant 'common_ca'"),
    ([], {"finetune": {"unit_prio": 0.3}}, "spec.yaml \\(finetune\\): unknown config key 'unit_prio'"),
    ([], {"finetune": {"epochs": 3}}, "finetune = .*epochs is set by the sweep itself"),
    (["--experiment", "fig99"], None, "--experiment fig99: no such spec file, and not a named experiment"),
])
def test_bad_input_is_one_line_before_any_trial(store, spec_file, tmp_path, flags, spec, message):
    sweep = tmp_path / "sweep"
    exp = [] if spec is None else ["--experiment", spec_file(**spec)]
    with pytest.raises(SystemExit, match=message) as info:
        main([*exp, "--shards", store, "--out", str(sweep), *flags])
    assert str(info.value).startswith("error: ") and "\n" not in str(info.value)
    assert not os.path.exists(sweep / "tune")  # no trial started


@pytest.mark.parametrize("name, trials", [("fig2", 60), ("fig3", 30), ("fig4", 18), ("table1", 12)])
def test_named_experiments_load_and_collapse_axes_that_do_not_apply(name, trials):
    spec = load_spec(name)
    assert spec.name == name and spec.version >= 1
    points = grid_points(spec)
    assert len(points) == trials and len({p.key for p in points}) == trials
    assert all(p.ephys_regions == "all" for p in points if p.ratio == 0)


def test_report_lays_out_the_ablation_and_marks_changes_all_seeds_agree_on(tmp_path):
    rows = []
    for variant, ratio, seed, region in itertools.product(("main", "separate"), (0.0, 0.5), (0, 1),
                                                          ("VISl", "VISp", "grey")):
        # a probe's unannotated channels (grey) decode perfectly here: the tables must not count them
        acc = 1.0 if region == "grey" else 0.3 + 0.1 * ratio + (0.05 if variant == "main" else 0.0) + 0.01 * seed
        p = Point(ratio=ratio, seed=seed, variant=variant)
        rows.append({**p.to_dict(), "weights": "", "mix": p.mix(), "point": p.key, "trial_id": p.key,
                     "session": f"o-{region}", "region": region, "modality": "ophys", "task": "static_gratings",
                     "accuracy": acc, "n": 10})
    sweep = Store(str(tmp_path / "sweep"))
    results.write(sweep, rows, "ablate", 1)
    assert report.build(sweep) == ["ablation.png", "results.md", "scaling.png", "transfer.png"]
    md = open(tmp_path / "sweep" / "results.md").read()
    assert "| main | **0.3800 ± 0.0050** |" in md and "| separate | 0.3300 ± 0.0050 |" in md  # mean over both ratios
    assert "| OPhys all (r=0, n=all, main) | 0.3550 ± 0.0050 | 0.3550 ± 0.0050 |" in md
    assert "| EPhys all + OPhys all (r=0.5, n=all, separate) | 0.3550 ± 0.0050 | 0.3550 ± 0.0050 |" in md
    assert "OPhys grey" not in md and "Left out: 8 row(s) of records labelled grey (no brain area)." in md
    assert len(results.read(sweep)) == 24  # the parquet keeps them
    changes = report.transfer_changes(report.prepare(results.read(sweep)))
    assert len(changes) == 4  # (main, separate) x (VISl, VISp), each against its own variant's baseline
    assert all(abs(delta - 0.05) < 1e-9 and agree for delta, agree in changes.values())


def test_asha_compares_validation_scores_and_bayes_searches_per_region_weights(store, spec_file, tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    def plan(search):
        spec = load_spec(spec_file(), {"search": search, "samples": 3})
        return prepare(spec, store, str(tmp_path / search), Resources()), spec

    asha, _ = plan("asha")
    cfg = tune_config(asha, Resources())
    assert isinstance(cfg.scheduler, ASHAScheduler) and cfg.metric is None  # the scheduler carries its metric
    assert cfg.scheduler._metric == "val_score" and cfg.scheduler._time_attr == "validations"
    bayes, spec = plan("bayes")
    cfg = tune_config(bayes, Resources())
    assert isinstance(cfg.search_alg, OptunaSearch) and cfg.num_samples == 3
    # TPE models the trials after its random start (Optuna's default start, 10, would make 3 samples a random search)
    assert cfg.search_alg._sampler._n_startup_trials == 2
    assert startup_trials(16, 0) == 4 and startup_trials(16, 5) == 5
    space = param_space(bayes)
    assert sorted(k for k in space if k.startswith("w:")) == ["w:ephys:VISl", "w:ephys:VISp", "w:ophys:VISl",
                                                              "w:ophys:VISp"]
    point = point_of({"w:ephys:VISl": 1.0, "w:ephys:VISp": 1.0, "w:ophys:VISl": 2.0, "w:ophys:VISp": 0.0,
                      "seed": 0}, spec)
    assert point.weights == {"ephys/VISl": 0.25, "ephys/VISp": 0.25, "ophys/VISl": 0.5, "ophys/VISp": 0.0}
    assert point.ratio == 0.5 and point.mix() == "ephys/VISl=0.25,ephys/VISp=0.25,ophys/VISl=0.5"
    assert point.regions("ophys") == ["VISl"] and point.key.startswith("r0.5_s0_")


def test_a_sweep_from_before_a_new_spec_field_restores_and_another_spec_is_refused(tmp_path):
    from shards.store import Store
    from trainer.tune.spec import ExperimentSpec
    from trainer.tune.sweep import check_same_sweep

    spec = ExperimentSpec(search="bayes").to_dict()
    context = {"spec": spec, "shards": "/store", "heldout": {"ophys": {"VISp": ["s1"]}}}
    sweep = Store(str(tmp_path))
    older = {k: v for k, v in spec.items() if k != "bayes_startup"}  # written before the field existed
    sweep.write_bytes("sweep.json", json.dumps({**context, "spec": older, "points": []}).encode())
    check_same_sweep(sweep, context, [])  # the field's default is what the old sweep ran with
    sweep.write_bytes("sweep.json", json.dumps({**context, "spec": {**older, "bayes_startup": 5}, "points": []}).encode())
    with pytest.raises(ValueError, match="holds another sweep \\(its spec differs\\)"):
        check_same_sweep(sweep, context, [])
