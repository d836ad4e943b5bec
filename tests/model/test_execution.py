"""Execution paths give the CPU reference numbers: CUDA backends (skipped without a GPU), torch.compile
of the dense blocks, bf16 autocast."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.model.support import assert_close_nan, batch_for, logits_by_query, model_for, small
from trainer.model.attention import _flash_varlen
from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO
from trainer.model.synthetic import synthetic_batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("backend", ["auto", "nested", "flex", "flash"])
def test_cuda_backends_match_the_cpu_reference_and_train(backend, amp):
    if backend == "flash" and _flash_varlen() is None:
        pytest.skip("flash-attn not installed")
    config = small(attn_backend=backend, amp=amp)
    batch = batch_for()
    reference = logits_by_query(model_for(small()), batch)
    model = model_for(config).cuda()
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    tol = 5e-2 if amp or backend == "flash" else 1e-4  # flash-attn computes in bf16
    assert_close_nan(logits_by_query(model, on_gpu), reference, atol=tol)
    model.train()(on_gpu)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor: no codegen for complex ops (falls back)
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_model_matches_eager_outputs_and_gradients():
    """``compile=True`` (torch.compile of the dense blocks, inductor on CPU here) changes no number
    beyond float rounding, forward or backward, and keeps the state_dict keys."""
    torch.manual_seed(0)
    cfg = ModelConfig.small()
    batch = synthetic_batch(modalities=[0, 1, 0, 1], n_units=50, n_sessions=3, config=cfg)
    eager = MultiModalPOYO(config=cfg, n_units=50, n_sessions=3).eval()
    compiled = MultiModalPOYO(config=cfg.replace(compile=True), n_units=50, n_sessions=3).eval()
    compiled.load_state_dict(eager.state_dict())
    a, c = eager(batch), compiled(batch)
    for task in a["logits"]:
        torch.testing.assert_close(c["logits"][task], a["logits"][task], atol=1e-5, rtol=1e-5)
    a["loss"].backward()
    c["loss"].backward()
    grads = {n: p.grad for n, p in compiled.named_parameters()}
    for n, p in eager.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", ["loop", "nested"])
def test_bf16_autocast_path_runs_and_stays_close_to_fp32(backend):
    """The bf16 autocast path CUDA runs, exercised on CPU (``amp_on_cpu``): same loss within bf16
    rounding, gradients for the same parameters, all finite."""
    torch.manual_seed(0)
    cfg = ModelConfig.small(attn_backend=backend)
    batch = synthetic_batch(modalities=[0, 1, 0, 1], n_units=50, n_sessions=3, config=cfg)
    fp32 = MultiModalPOYO(config=cfg, n_units=50, n_sessions=3).eval()
    bf16 = MultiModalPOYO(config=cfg.replace(amp_on_cpu=True), n_units=50, n_sessions=3).eval()
    bf16.load_state_dict(fp32.state_dict())
    a, b = fp32(batch), bf16(batch)
    # logits come back float32 (the heads' output is cast up); that they differ at all from fp32's
    # shows the blocks really ran in bf16
    assert all(v.dtype == torch.float32 for v in b["logits"].values())
    assert any(not torch.equal(b["logits"][t], a["logits"][t]) for t in a["logits"])
    for t in a["logits"]:
        torch.testing.assert_close(b["logits"][t], a["logits"][t], atol=0.1, rtol=0.05)
    assert b["loss"].dtype == torch.float32 and torch.isfinite(b["loss"])
    torch.testing.assert_close(b["loss"], a["loss"], atol=0.05, rtol=0.02)
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(fp32.named_parameters(), bf16.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all(), name
