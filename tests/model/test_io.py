"""Checkpoints (weights_only round trip, extra entries, execution settings changed on load) and
vocabulary growth (trainer.model.io)."""

from __future__ import annotations

import torch

from tests.model.support import N_SESSIONS, N_UNITS, batch_for, logits_by_query, model_for, small
from trainer.model.io import grow_vocab, load_checkpoint, load_checkpoint_with_extra, save_checkpoint
from trainer.model.synthetic import synthetic_batch


def test_save_load_round_trip_with_weights_only_gives_identical_outputs(tmp_path):
    model = model_for(small(rotate_values=True))
    batch = batch_for()
    save_checkpoint(model, str(tmp_path / "ck.pt"), variant="main")
    loaded = load_checkpoint(str(tmp_path / "ck.pt")).eval()
    assert torch.equal(logits_by_query(model, batch).nan_to_num(), logits_by_query(loaded, batch).nan_to_num())
    # plain state_dict route
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = model_for(small(rotate_values=True), seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(logits_by_query(model, batch).nan_to_num(), logits_by_query(fresh, batch).nan_to_num())


def test_checkpoint_extra_entries_and_execution_changes_come_back(tmp_path):
    model = model_for(small())
    save_checkpoint(model, str(tmp_path / "ck.pt"), meta='{"variant": "main"}', step=3)
    loaded, extra = load_checkpoint_with_extra(str(tmp_path / "ck.pt"), amp=False)
    assert extra == {"meta": '{"variant": "main"}', "step": 3}
    assert loaded.config == model.config.replace(amp=False)
    batch = batch_for()
    assert torch.equal(logits_by_query(model, batch).nan_to_num(), logits_by_query(loaded.eval(), batch).nan_to_num())


def test_growing_the_vocabularies_keeps_old_embeddings():
    model = model_for(small())
    units, sessions = model.unit_emb.weight.detach().clone(), model.session_emb.weight.detach().clone()
    new_units, new_sessions = grow_vocab(model, n_units=30, n_sessions=2)
    assert new_units.tolist() == list(range(N_UNITS, N_UNITS + 30))
    assert new_sessions.tolist() == [N_SESSIONS, N_SESSIONS + 1]
    assert torch.equal(model.unit_emb.weight[:N_UNITS], units)
    assert torch.equal(model.session_emb.weight[:N_SESSIONS], sessions)
    assert model.unit_emb.weight.requires_grad and len(model.unit_emb) == N_UNITS + 30
    # the grown model reads the new rows
    batch = synthetic_batch(modalities=[0, 1], n_units=N_UNITS + 30, n_sessions=N_SESSIONS + 2, seed=3)
    batch["input_unit_index"] = batch["input_unit_index"] % 30 + N_UNITS
    model.train()(batch)["loss"].backward()
    assert model.unit_emb.weight.grad[N_UNITS:].abs().sum() > 0
