"""Evaluation as the papers do it: logits averaged per presentation over the overlapping windows that
query it, one argmax per presentation, accuracy per (session, region) record, mean over records (the
headline; a batch without record_index counts each session as one record), next to
the pooled per-query figure; the same across ranks (partial tallies merged, and a real 2-process gloo
all_reduce); the evaluation plan's overlapping windows cover every presentation of a chunk and never
cross a chunk edge; the training plan and training tokens are those of the code before (golden checksums).
Hand-made tensors and tables only, no store."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from shards.stream.mixture import parse_mix
from shards.stream.plan import PlanConfig, plan_eval, plan_train_epoch
from shards.stream.tokens import DecodedChunk, TokenConfig, pack, presentation_id, window_tokens
from trainer.model.config import TaskSpec
from trainer.tally import Tally

TASKS = (TaskSpec("cls", 3),)
SESSIONS = ["s0", "s1", "s2"]


def batch_of(windows):
    """windows: [(modality, session, weight, [(presentation id, label, logits), ...]), ...] ->
    (model output, batch) of one packed batch with a single classification task."""
    q = [(w, *query) for (_, _, w, queries) in windows for query in queries]
    n_out = [len(queries) for (*_, queries) in windows]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(n_out)]), dtype=torch.int32)
    batch = {"modality": torch.tensor([w[0] for w in windows]), "session_index": torch.tensor([w[1] for w in windows]),
             "input_cu_seqlens": torch.zeros(len(windows) + 1, dtype=torch.int32), "output_cu_seqlens": cu,
             "output_task_index": torch.zeros(len(q), dtype=torch.int64),
             "output_labels": torch.tensor([x[2] for x in q]),
             "output_presentation": torch.tensor([x[1] for x in q], dtype=torch.int64),
             "output_weights": torch.tensor([x[0] for x in q], dtype=torch.float32)}
    out = {"query_index": {"cls": torch.arange(len(q))},
           "logits": {"cls": torch.tensor([x[3] for x in q], dtype=torch.float32)}}
    return out, batch


# Session s0 (EPhys): presentation 10 (label 0) in two windows, right then wrong, mean logits right;
# presentation 11 (label 1) in one window, wrong. Session s1 (EPhys): presentation 20 (label 2) in three
# windows, all right, plus a padding window (weight 0) that would flip it. Session s2 (OPhys): presentation
# 30 (label 1) in two windows, one vote each, mean logits wrong.
WINDOWS = [
    (0, 0, 1.0, [(10, 0, [2., 0., 0.])]),
    (0, 0, 1.0, [(10, 0, [0., 1., 0.]), (11, 1, [0., 0., 1.])]),
    (0, 1, 1.0, [(20, 2, [0., 0., 1.])]),
    (0, 1, 1.0, [(20, 2, [0., 0., 1.])]),
    (1, 2, 1.0, [(30, 1, [0., 1., 0.])]),
    (0, 1, 1.0, [(20, 2, [0., 0., 1.])]),
    (1, 2, 1.0, [(30, 1, [3., 0., 0.])]),
    (0, 1, 0.0, [(20, 2, [9., 0., 0.])]),  # padding
]


def tally_of(windows, **kw) -> Tally:
    t = Tally(TASKS, SESSIONS, confusion=True, per_presentation=True, **kw)
    for i in range(0, len(windows), 3):  # a few batches, so sums cross batch boundaries
        t.add(*batch_of(windows[i:i + 3]))
    return t


def test_logits_are_averaged_per_presentation_then_accuracy_per_session_then_mean_over_sessions():
    s = tally_of(WINDOWS).summary()
    ephys, ophys = s["modality"]["ephys"]["tasks"]["cls"], s["modality"]["ophys"]["tasks"]["cls"]
    # per session: s0 1 of 2 presentations, s1 1 of 1, s2 0 of 1
    assert s["record"]["s0"]["tasks"]["cls"] == {"acc": 0.5, "n": 2.0}
    assert s["record"]["s1"]["tasks"]["cls"] == {"acc": 1.0, "n": 1.0}
    assert s["record"]["s2"]["tasks"]["cls"] == {"acc": 0.0, "n": 1.0} and s["record"]["s2"]["modality"] == "ophys"
    assert s["record"]["s2"]["session"] == "s2" and s["record"]["s2"]["region"] is None  # no record_index
    assert ephys == {"acc": 0.75, "n": 3.0, "records": 2}  # mean of 0.5 and 1.0, not 2 of 3 presentations
    assert ophys["acc"] == 0.0
    assert s["score"] == pytest.approx(0.375)
    # pooled per query: EPhys 4 of 6 queries right (the padding window counts nowhere), OPhys 1 of 2
    p = s["pooled"]
    assert p["modality"]["ephys"]["tasks"]["cls"]["acc"] == pytest.approx(4 / 6)
    assert p["modality"]["ephys"]["tasks"]["cls"]["n"] == 6 and p["modality"]["ophys"]["tasks"]["cls"]["acc"] == 0.5
    assert p["score"] == pytest.approx((4 / 6 + 0.5) / 2)
    # one confusion count per presentation (rows = true class)
    conf = tally_of(WINDOWS).confusion_matrices()["cls"]
    assert conf["ephys"].sum() == 3 and conf["ephys"][0, 0] == 1 and conf["ephys"][1, 2] == 1
    assert conf["ophys"].sum() == 1 and conf["ophys"][1, 0] == 1


RECORDS = [("e1", "VISl"), ("e1", "VISp"), ("o1", "VISp")]  # Vocab.records order: sorted (session_id, region)


def test_two_records_of_one_session_are_scored_apart_and_the_headline_is_their_mean():
    # EPhys session e1 (session index 0) has two records. Presentation 10 (label 0) is queried in both:
    # in VISl (record 0) by two windows whose mean logits are right, in VISp (record 1) by one wrong
    # window; averaged over the session it would be right (3 vs 2.5). VISp also has presentation 11
    # (label 1), right. So VISl 1 of 1, VISp 1 of 2: headline EPhys (1 + 0.5) / 2, not 2 of 2 (per
    # session) nor 2 of 3 (per record-presentation, pooled). OPhys o1 (record 2): presentation 30 right.
    windows = [(0, 0, 0, [(10, 0, [2., 0., 0.])]), (0, 0, 1, [(10, 0, [0., 2.5, 0.]), (11, 1, [0., 1., 0.])]),
               (0, 0, 0, [(10, 0, [1., 0., 0.])]), (1, 1, 2, [(30, 2, [0., 0., 1.])])]
    t = Tally(TASKS, ["e1", "o1"], record_ids=RECORDS, confusion=True, per_presentation=True)
    for i in range(0, len(windows), 2):
        out, batch = batch_of([(m, s, 1.0, q) for m, s, _, q in windows[i:i + 2]])
        batch["record_index"] = torch.tensor([r for _, _, r, _ in windows[i:i + 2]])
        t.add(out, batch)
    s = t.summary()
    assert set(s["record"]) == {"e1/VISl", "e1/VISp", "o1/VISp"}
    assert s["record"]["e1/VISl"] == {"session": "e1", "region": "VISl", "modality": "ephys",
                                      "tasks": {"cls": {"acc": 1.0, "n": 1.0}}}
    assert s["record"]["e1/VISp"]["tasks"]["cls"] == {"acc": 0.5, "n": 2.0}
    assert s["record"]["o1/VISp"]["modality"] == "ophys" and s["record"]["o1/VISp"]["tasks"]["cls"]["acc"] == 1.0
    assert s["modality"]["ephys"]["tasks"]["cls"] == {"acc": 0.75, "n": 3.0, "records": 2}
    assert s["score"] == pytest.approx((0.75 + 1.0) / 2)
    assert t.confusion_matrices()["cls"]["ephys"].sum() == 3  # one count per record's presentation
    assert set(s["pooled"]["session"]) == {"e1", "o1"}  # the per-query figures stay per session
    sc = t.scalars("test", sessions=True)
    assert sc["test_record/e1/VISp/acc/cls"] == 0.5 and sc["test/acc/ephys/cls"] == 0.75
    # split over two ranks, merged: the same numbers
    halves = [Tally(TASKS, ["e1", "o1"], record_ids=RECORDS, per_presentation=True) for _ in range(2)]
    for i, w in enumerate(windows):
        out, batch = batch_of([(w[0], w[1], 1.0, w[3])])
        batch["record_index"] = torch.tensor([w[2]])
        halves[i % 2].add(out, batch)
    merged = halves[0].merge(halves[1]).summary()
    assert merged["record"] == s["record"] and merged["score"] == s["score"]


def test_scalars_hold_headline_and_pooled():
    sc = tally_of(WINDOWS).scalars("val", sessions=True)
    assert sc["val/score"] == pytest.approx(0.375) and sc["val/acc/ephys/cls"] == 0.75
    assert sc["val/acc_pooled/ephys/cls"] == pytest.approx(4 / 6)
    assert sc["val/score_pooled"] == pytest.approx((4 / 6 + 0.5) / 2)
    assert sc["val_record/s0/acc/cls"] == 0.5 and "val/loss/ephys/cls" in sc


def test_training_tallies_stay_pooled():
    t = Tally(TASKS, SESSIONS)
    out, batch = batch_of(WINDOWS)
    t.add(out, batch)
    s = t.summary()
    assert "pooled" not in s and s["modality"]["ephys"]["tasks"]["cls"]["acc"] == pytest.approx(4 / 6)


def test_presentations_split_over_two_ranks_merge_to_the_single_rank_numbers():
    # windows dealt out in turn, as the evaluation plan does: presentation 10's two windows land on
    # different ranks, and rank 1 alone would call it wrong
    rank0 = tally_of(WINDOWS[0::2])
    rank1 = tally_of(WINDOWS[1::2])
    assert rank1.summary()["record"]["s0"]["tasks"]["cls"]["acc"] == 0.0
    merged = rank0.merge(rank1).summary()
    assert merged == tally_of(WINDOWS).summary()
    assert merged["score"] == pytest.approx(0.375)


def _rank_main(rank: int, world: int, init: str, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results.put((rank, tally_of(WINDOWS[rank::world]).all_reduce().summary()))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_gives_every_rank_the_headline(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, init, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    want = tally_of(WINDOWS).summary()
    assert got[0] == got[1]
    assert got[0]["score"] == want["score"] and got[0]["record"] == want["record"]
    assert got[0]["pooled"]["score"] == pytest.approx(want["pooled"]["score"])


def test_regression_tasks_average_predictions_per_presentation():
    tasks = (TaskSpec("reg", 1, kind="regression"),)
    batch = {"modality": torch.tensor([0, 0, 0]), "session_index": torch.tensor([0, 0, 0]),
             "input_cu_seqlens": torch.zeros(4, dtype=torch.int32),
             "output_cu_seqlens": torch.tensor([0, 2, 3, 4], dtype=torch.int32),
             "output_task_index": torch.zeros(4, dtype=torch.int64), "output_labels": torch.full((4,), -1),
             "output_presentation": torch.tensor([1, 2, 1, 2]),
             "output_values": torch.tensor([[0.], [2.], [0.], [2.]]), "output_weights": torch.ones(4)}
    out = {"query_index": {"reg": torch.arange(4)}, "logits": {"reg": torch.tensor([[1.], [2.], [-1.], [2.]])}}
    t = Tally(tasks, ["s0"], per_presentation=True)
    t.add(out, batch)
    s = t.summary()
    assert s["record"]["s0"]["tasks"]["reg"]["r2"] == pytest.approx(1.0)  # means 0 and 2: exact
    assert s["pooled"]["session"]["s0"]["tasks"]["reg"]["r2"] == pytest.approx(1 - 2 / 4)
    assert s["score"] == pytest.approx(1.0)


# ---- the evaluation plan ---------------------------------------------------------------------------------

CHUNKS = [("train", 10.0), ("train", 7.3), ("valid", 9.6), ("train", 0.6), ("test", 10.4), ("train", 12.5),
          ("valid", 1.0), ("valid", 0.7), ("test", 3.1)]


def chunks_table(chunks=CHUNKS) -> pd.DataFrame:
    """Three (session, region) records of back-to-back chunks of each (split, length)."""
    rows = []
    for sid, mod, reg in [("e1", "ephys", "VISp"), ("e1", "ephys", "VISl"), ("o1", "ophys", "VISp")]:
        t = 0.0
        for split, length in chunks:
            rows.append(dict(session_id=sid, modality=mod, region=reg, split=split, t_start=t, t_end=t + length))
            t += length
    return pd.DataFrame(rows)


def chunk_with_presentations(a: float, b: float, seed: int) -> DecodedChunk:
    """An EPhys chunk [a, b) listing presentations that overlap it (some crossing its edges, as a chunk's
    stimulus table does): 0.25-s flashes back to back and 2-s gratings with gaps."""
    rng = np.random.default_rng(seed)
    flashes = np.arange(a - 0.2 + rng.uniform(0, 0.25), b, 0.25)
    gratings = np.arange(a - 1.5, b, 3.0)
    start = np.concatenate([flashes, gratings])
    end = np.concatenate([flashes + 0.25, gratings + 2.0])
    task = np.concatenate([np.zeros(len(flashes), np.int64), np.ones(len(gratings), np.int64)])
    keep = (end > a) & (start < b)
    times = np.sort(rng.uniform(a, b, 50))
    return DecodedChunk("k", 0, 0, a, b, np.arange(3), times, rng.integers(0, 3, 50).astype(np.int32), None,
                        task[keep], start[keep], end[keep], rng.integers(0, 6, int(keep.sum())))


@pytest.mark.parametrize("stride", [None, 0.5, 0.25])
def test_overlapping_eval_windows_cover_every_presentation_and_stay_in_their_chunk(stride):
    chunks = chunks_table()
    cfg = PlanConfig(eval_stride_s=stride)
    for split in ("valid", "test"):
        plan = plan_eval(chunks, split, cfg, world_size=2, batch_size=3)
        assert len(plan) % 6 == 0 and not plan.pad[:len(plan) - 5].any()
        real = ~plan.pad
        a, b = chunks.t_start.to_numpy()[plan.chunk], chunks.t_end.to_numpy()[plan.chunk]
        assert (plan.t0 >= a - 1e-9).all() and (plan.t0 + 1.0 <= b + 1e-9).all()  # never across a chunk edge
        assert set(chunks.split.iloc[plan.chunk]) == {split}
        for row in np.nonzero((chunks.split == split).to_numpy())[0]:
            t0 = np.sort(plan.t0[real & (plan.chunk == row)])
            ca, cb = float(chunks.t_start[row]), float(chunks.t_end[row])
            if cb - ca < 1.0 - 1e-9:
                assert len(t0) == 0  # shorter than a window: no window, as before
                continue
            gaps = np.diff(t0)
            if len(gaps):
                assert np.allclose(gaps[:-1], stride or 0.5) and 0 < gaps[-1] <= (stride or 0.5) + 1e-9
            assert t0[0] == pytest.approx(ca) and t0[-1] + 1.0 == pytest.approx(cb)  # from start to end
            c = chunk_with_presentations(ca, cb, seed=row)
            queried = set()
            for t in t0:
                queried |= set(window_tokens(c, float(t), TokenConfig(), None)[6].tolist())
            # every presentation that overlaps the chunk as much as the query rule asks is queried
            need = 0.5 * np.minimum(c.q_end - c.q_start, 1.0)
            inside = np.minimum(c.q_end, cb) - np.maximum(c.q_start, ca) >= need - 1e-9
            assert set(presentation_id(c.q_start[inside]).tolist()) <= queried
            assert inside.sum() >= 4


def test_bad_eval_stride_is_an_error():
    with pytest.raises(ValueError, match="eval_stride_s"):
        plan_eval(chunks_table(), "valid", PlanConfig(eval_stride_s=1.5))


def test_the_training_plan_and_tokens_are_those_of_before():
    """Checksums of the training plan and of a training batch (all keys but the new ones) as the code before
    overlapping evaluation windows made them; the evaluation stride does not touch training."""
    c = chunks_table(CHUNKS[:7])  # the table the checksum was taken on
    for stride in (None, 0.25):
        crc = 0
        for mix in ("ephys=1,ophys=1", "ephys/VISl=0.2,ephys=0.3,ophys=0.5"):
            for epoch in (0, 1):
                for ew in (None, 37):
                    plan = plan_train_epoch(c, parse_mix(mix), epoch, PlanConfig(seed=5, epoch_windows=ew,
                                                                                 shuffle_window=4,
                                                                                 eval_stride_s=stride))
                    for a in (plan.chunk, plan.t0, plan.selector, plan.pad):
                        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
        assert crc == 2183342439
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 10, 400))
    su = rng.integers(0, 7, 400).astype(np.int32)
    qs = np.arange(0, 10, 0.25)
    ch = DecodedChunk("k", 0, 0, 0.0, 10.0, np.arange(7) + 3, times, su, None, np.zeros(len(qs), np.int64), qs,
                      qs + 0.25, rng.integers(0, 6, len(qs)))
    ft = np.arange(0, 10, 1 / 30)
    co = DecodedChunk("k", 1, 0, 0.0, 10.0, np.arange(5), ft, None, rng.normal(size=(len(ft), 5)).astype(np.float32),
                      np.full(len(qs), 2, np.int64), qs, qs + 0.25, rng.integers(0, 119, len(qs)))
    wins = [window_tokens(c_, float(t0), TokenConfig(unit_dropout=True), np.random.default_rng(i))
            for i, t0 in enumerate(rng.uniform(0, 9, 12)) for c_ in (ch, co)]
    b = pack(wins, [0, 1] * 12, [0] * 24, 1.0, [False] * 23 + [True], [2, 0] * 12)
    assert b["record_index"].dtype == np.int64 and b["record_index"].tolist() == [2, 0] * 12
    assert list(b)[:-1] == list(pack(wins, [0, 1] * 12, [0] * 24, 1.0, [False] * 23 + [True]))
    crc = 0
    for k, v in b.items():
        if k not in ("output_presentation", "record_index", "calcium_bin", "output_span", "sample_unit_index",
                     "sample_unit_cu_seqlens"):
            crc = zlib.crc32(k.encode() + np.ascontiguousarray(v).tobytes(), crc)
    assert crc == 3642167818
    # each query's span is its presentation's overlap with the window: all of a 0.25-s presentation, or at least half
    # each window lists the units dropout kept: every unit with a token, and silent ones
    cu_m, cu_in = b["sample_unit_cu_seqlens"], b["input_cu_seqlens"]
    for i in range(24):
        listed = set(b["sample_unit_index"][cu_m[i]:cu_m[i + 1]].tolist())
        assert set(b["input_unit_index"][cu_in[i]:cu_in[i + 1]].tolist()) <= listed <= set(range(3, 10)) | set(range(5))
    assert any(len(set(b["sample_unit_index"][cu_m[i]:cu_m[i + 1]].tolist())) < (7, 5)[i % 2] for i in range(24))
    assert ((b["output_span"] >= 0.125 - 1e-6) & (b["output_span"] <= 0.25 + 1e-6)).all()
    assert int(b["calcium_bin"]) == 1  # the default: one token per frame, the tokens of before
    assert b["output_presentation"].dtype == np.int64 and len(b["output_presentation"]) == len(b["output_labels"])
    assert set(b["output_presentation"].tolist()) <= set(presentation_id(qs).tolist())  # start, in microseconds
