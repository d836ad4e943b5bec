"""The multi-modal POYO model (Knight et al. 2025, on POYO+ by Azabou et al. 2025): its data flow and loss.

    packed batch (docs/batch.md)
      -> per modality: cross-attention encoder, its own latent queries (same number and shape)
         EPhys: spike token x = u (unit embedding)        OPhys: calcium token x = u + W_f f
      -> latents of all samples, one dense (B, M, D) block, in batch order
      -> shared trunk: `depth` x [rotary self-attention, GEGLU feed-forward], pre-norm
      -> decoder: queries (task embedding + session embedding) at the output times cross-attend
         to their sample's latents
      -> task heads: one linear layer per task (classes, or regression dimension)
      -> (likelihood_readout) + each query's units' log-likelihood per class under a shared encoding model
         read from their rows (trainer.model.likelihood)
      -> loss: per-task mean (cross-entropy / MSE), times the share of samples asking for the task

Every attention block rotates queries and keys by their timestamps (trainer.model.rotary). Token
sequences stay packed (``cu_seqlens``) end to end: the encoders use varlen attention
(trainer.model.attention), the latents are dense because every sample has exactly M of them. The
blocks (encoder, latent block, feed-forward net, dropout) are in trainer.model.layers; checkpoints
and vocabulary growth in trainer.model.io; fake batches in trainer.model.synthetic.

The variants of the paper's ablation are the same class with other config knobs
(``trainer.model.variants``): one shared encoder (``shared_encoder``), modality-specific self-attention
after the encoders (``modality_depth``), stacked cross-attention (``encoder_ca_depth``).

``forward(batch)`` returns ``{"logits": {task: (Q_k, out_dim)}, "query_index": {task: (Q_k,)},
"loss": (), "task_loss": {task: ()}}`` (loss terms when the batch carries labels). Accuracy is the
trainer's business (``trainer.tally``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.attention import Rope, RotaryCrossAttention
from trainer.model.config import ModelConfig
from trainer.model.counts import CountHead, count_nll
from trainer.model.embeddings import GrowableEmbedding
from trainer.model.layers import Encoder, FeedForward, LatentBlock
from trainer.model.likelihood import LikelihoodHead, likelihood_logits
from trainer.model.packing import segment_ids
from trainer.model.rotary import RotaryTimeEmbedding

# ----------------------------------------------------------------------------- the model


class MultiModalPOYO(nn.Module):
    """EPhys + OPhys encoders, shared self-attention trunk, multi-task decoder.

    Args (keyword-only):
        config: ModelConfig (its variant knobs pick the architecture)
        n_units: rows of the global unit vocabulary; n_sessions: rows of the session vocabulary
    """

    latent_times: Tensor

    def __init__(self, *, config: ModelConfig, n_units: int, n_sessions: int) -> None:
        super().__init__()
        c = self.config = config
        self.unit_emb = GrowableEmbedding(num=n_units, dim=c.unit_rank or c.dim, init_scale=c.emb_init_scale)
        # unit_rank r > 0: a unit is r numbers, seen through one shared (r, D) map that keeps the rows' scale
        self.unit_up = nn.Linear(c.unit_rank, c.dim, bias=False) if c.unit_rank else None
        if self.unit_up is not None:
            nn.init.normal_(self.unit_up.weight, std=c.unit_rank ** -0.5)
        self.session_emb = GrowableEmbedding(num=n_sessions, dim=c.dim, init_scale=c.emb_init_scale)
        self.task_emb = GrowableEmbedding(num=len(c.tasks), dim=c.dim, init_scale=c.emb_init_scale)
        self.rotary = RotaryTimeEmbedding(dim_head=c.dim_head, t_min=c.t_min, t_max=c.t_max,
                                          rotate_frac=c.rotate_frac)
        # latent time steps spread evenly over the window: (i + 1/2) * latent_step, each with all latents
        steps = (torch.arange(c.n_latent_steps, dtype=torch.float32) + 0.5) * c.latent_step
        self.register_buffer("latent_times", steps.repeat_interleave(c.latents_per_step), persistent=False)
        # encoders[modality code]: 0 EPhys, 1 OPhys (docs/batch.md); one encoder when shared
        kinds = [True] if c.shared_encoder else [False, True]
        omega = self.rotary.omega.float()
        self.encoders = nn.ModuleList(Encoder(config=c, calcium=calcium, omega=omega) for calcium in kinds)
        self.trunk = nn.ModuleList(LatentBlock(config=c, omega=omega) for _ in range(c.depth))
        self.dec_attn = RotaryCrossAttention(dim=c.dim, heads=c.cross_heads, dim_head=c.dim_head,
                                             dropout=c.attn_dropout, rotate_values=False, backend=c.attn_backend,
                                             time_prior=c.time_prior, omega=omega)
        self.dec_ffn = FeedForward(dim=c.dim, mult=c.ffn_mult, dropout=c.ffn_dropout)
        self.heads = nn.ModuleDict({t.name: nn.Linear(c.dim, t.out_dim) for t in c.tasks})
        # the heads that code classes: each task's (name, classes), None for a regression
        class_tasks = [(t.name, t.out_dim if t.kind == "classification" else None) for t in c.tasks]
        self.count_head = (CountHead(dim=c.dim, rank=c.count_rank, norm=c.count_norm, tasks=class_tasks)
                           if c.count_loss > 0 else None)
        self.likelihood_head = (LikelihoodHead(dim=c.dim, rank=c.likelihood_rank, tasks=class_tasks,
                                               task_gains=c.likelihood_task_gains,
                                               before=c.likelihood_ophys_before,
                                               ophys_form=c.likelihood_ophys_form,
                                               feedback=c.likelihood_ophys_feedback,
                                               fit_norm=c.likelihood_ophys_fit_norm)
                                if c.likelihood_readout else None)
        # own_rows: the readout's units are their own table, so fitting rates never moves the rows the encoder reads
        self.readout_emb = (GrowableEmbedding(num=n_units, dim=c.dim, init_scale=c.emb_init_scale)
                            if c.likelihood_readout and c.likelihood_own_rows else None)
        if c.zero_init_residual:
            self._zero_residual_outputs()
        if c.compile:  # dense, fixed-shape parts; in place, so state_dict keys do not change
            for m in [*self.trunk, *(b for e in self.encoders for b in e.blocks), self.dec_ffn]:
                m.compile(dynamic=True)

    @torch.no_grad()
    def _zero_residual_outputs(self) -> None:
        """Start every residual branch of the latent blocks (trunk, modality blocks) at zero, so each
        block is the identity at initialisation and the encoders' output reaches the decoder unchanged
        (GPT-2 / Fixup-style; measured in docs/model.md)."""
        blocks = [*self.trunk, *(b for e in self.encoders for b in e.blocks)]
        for blk in blocks:
            for linear in (blk.attn.to_out, blk.ffn.down):
                linear.weight.zero_()
                linear.bias.zero_()

    # -- forward -------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """batch: the packed dict of docs/batch.md (on the model's device).
        Returns logits and query indices per task, plus loss terms if the batch has labels."""
        device = self.latent_times.device
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=self.config.amp and (device.type == "cuda" or self.config.amp_on_cpu)):
            latent_rope = self.rotary(self.latent_times)  # computed once, used by every block
            latents = self.encode(batch, latent_rope)  # (B, M, D)
            for block in self.trunk:
                latents = block(latents, latent_rope)
            outputs = self.decode(latents, batch, latent_rope)  # (Q, D)
            out = self.readout(outputs, batch["output_task_index"])
        if self.likelihood_head is not None:
            out["decoder_logits"] = dict(out["logits"])
            fit = self._add_likelihood(out, batch)
            if fit is not None:
                out["likelihood_nll"] = fit
        if "output_labels" in batch or "output_values" in batch:
            out.update(self.loss(out, batch))
        return out

    def encode(self, batch: dict[str, Tensor], latent_rope: Rope) -> Tensor:
        """Packed tokens of B samples -> latents (B, M, D) in batch order. Each modality's samples go
        through that modality's encoder only (an EPhys-only batch never touches the OPhys encoder)."""
        if "window_s" in batch and abs(float(batch["window_s"]) - self.config.window_s) > 1e-6:
            raise ValueError(f"batch windows are {float(batch['window_s'])} s; the model's latents span "
                             f"config.window_s = {self.config.window_s} s")
        lag = float(batch.get("calcium_lag_s", 0.0))
        if abs(lag - self.config.calcium_lag_s) > 1e-6:
            raise ValueError(f"batch OPhys windows read {lag} s ahead; the model was "
                             f"built for config.calcium_lag_s = {self.config.calcium_lag_s} s")
        frames = int(batch.get("calcium_bin", self.config.calcium_bin))  # absent: a hand-made batch (synthetic.py)
        if frames != self.config.calcium_bin:
            raise ValueError(f"batch OPhys tokens average {frames} frame(s); the model was "
                             f"built for config.calcium_bin = {self.config.calcium_bin}")
        cu = batch["input_cu_seqlens"].long()
        lens = torch.diff(cu)
        n_tokens = int(cu[-1])
        token_rope = self.rotary(batch["input_timestamps"])
        if len(self.encoders) == 1:
            return self._encode_with(self.encoders[0], batch, None, lens, token_rope, latent_rope)
        modality = batch["modality"]
        parts, order = [], []
        for code, encoder in enumerate(self.encoders):
            is_code = modality == code
            samples = is_code.nonzero().squeeze(1)
            if samples.numel() == 0:
                continue
            tokens = None if samples.numel() == len(lens) else \
                is_code.repeat_interleave(lens, output_size=n_tokens).nonzero().squeeze(1)
            parts.append(self._encode_with(encoder, batch, tokens, lens[samples], token_rope, latent_rope))
            order.append(samples)
        latents = torch.cat(parts)
        return latents if len(parts) == 1 else latents[torch.argsort(torch.cat(order))]

    def _encode_with(self, encoder: Encoder, batch: dict[str, Tensor], tokens: Tensor | None, lens: Tensor,
                     token_rope: Rope, latent_rope: Rope) -> Tensor:
        """Run one encoder on the samples whose token rows are ``tokens`` (None: all) -> (S, M, D)."""
        units, values = batch["input_unit_index"], batch["input_values"]
        if tokens is not None:
            units, values, token_rope = units[tokens], values[tokens], token_rope[tokens]
        present, unit_of_token = torch.unique(units, return_inverse=True)
        cu = F.pad(lens.cumsum(0), (1, 0))
        return encoder(unit_rows=self.unit_rows(present), unit_of_token=unit_of_token, values=values,
                       token_rope=token_rope, cu=cu, max_len=int(lens.max()), latent_rope=latent_rope)

    def unit_rows(self, index: Tensor) -> Tensor:
        """The D-wide rows of units ``index``: the table's rows, through the shared map when ``unit_rank`` > 0.

        Why a rank: on the benchmark corpus a unit's tuning is 10 numbers; a D-wide row gives a new session D
        numbers per unit to fit from its few presentations. Measured level with D-wide rows over 3 seeds
        (docs/model.md section 13), so 0 (off) by default."""
        rows = self.unit_emb(index)
        return rows if self.unit_up is None else self.unit_up(rows)

    def decode(self, latents: Tensor, batch: dict[str, Tensor], latent_rope: Rope) -> Tensor:
        """Output queries o = task embedding + session embedding, at the output times, attend to their
        sample's latents (papers' eq. 3). latents (B, M, D) -> (Q, D)."""
        n_samples, m, _ = latents.shape
        cu_q = batch["output_cu_seqlens"].long()
        n_queries = int(cu_q[-1])
        if n_queries == 0:
            return latents.new_zeros(0, latents.shape[-1])
        per_sample = torch.diff(cu_q)
        sample_of_query = segment_ids(cu_q, total=n_queries)
        queries = self.task_emb(batch["output_task_index"]) + \
            self.session_emb(batch["session_index"][sample_of_query])
        k, v = self.dec_attn.context(latents, latent_rope)  # (B*M, H, d)
        cu_k = torch.arange(n_samples + 1, device=latents.device) * m
        y = queries + self.dec_attn(queries, self.rotary(batch["output_timestamps"]), k, v,
                                    cu_q=cu_q, cu_k=cu_k, max_q=int(per_sample.max()), max_k=m)
        return y + self.dec_ffn(y)

    def readout(self, outputs: Tensor, task_index: Tensor) -> dict[str, Any]:
        """Route each output token to its task's linear head. outputs (Q, D), task_index (Q,)."""
        logits, index = {}, {}
        for k, task in enumerate(self.config.tasks):
            rows = (task_index == k).nonzero().squeeze(1)
            logits[task.name] = self.heads[task.name](outputs[rows]).float()
            index[task.name] = rows
        return {"logits": logits, "query_index": index}

    def _add_likelihood(self, out: dict[str, Any], batch: dict[str, Tensor]) -> Tensor | None:
        """Add the likelihood readout's per-class log-likelihoods to the logits of the queries it scores; return
        its encoding model's fit term (None when the batch has no labelled query it scores)."""
        c = self.config
        n_queries = int(batch["output_task_index"].numel())
        q_sample = segment_ids(batch["output_cu_seqlens"].long(), total=n_queries)
        terms, fit = likelihood_logits(self.likelihood_head, self.unit_rows if self.readout_emb is None else
                                       self.readout_emb, batch, q_sample, window_s=c.window_s, ophys=c.likelihood_ophys,
                                       latency=(c.likelihood_latency_ephys_s, c.likelihood_latency_ophys_s))
        # each query's row in its task's logits (the tasks' query lists are disjoint, so one map serves all)
        position = torch.full((n_queries,), -1, dtype=torch.long, device=q_sample.device)
        for index in out["query_index"].values():
            position[index] = torch.arange(len(index), device=q_sample.device)
        for k, (rows, ll) in terms.items():
            name = c.tasks[k].name
            out["logits"][name] = out["logits"][name].index_add(0, position[rows], ll.to(out["logits"][name].dtype))
        return fit

    def loss(self, out: dict[str, Any], batch: dict[str, Tensor]) -> dict[str, Any]:
        """POYO+ weighting: each task's loss is its weighted mean over its queries, multiplied by the
        number of samples that ask for the task, summed, divided by the batch size (so a query's weight
        falls as its task asks for more predictions), times the task's configured weight.
        Classification: cross-entropy on ``output_labels`` (label < 0 = unlabelled, ignored).
        Regression: MSE on ``output_values`` (Q, out_dim) float."""
        sample_of_query = segment_ids(batch["output_cu_seqlens"].long())
        total, task_loss = self._task_losses(out["logits"], out["query_index"], batch, sample_of_query)
        result = {"loss": total, "task_loss": task_loss}
        if "decoder_logits" in out and self.config.likelihood_decoder_loss > 0:
            # the decoder's own logits trained alone too, so its trunk keeps learning the shared code from EPhys
            # queries that the readout already decodes (docs/model.md section 18)
            alone, _ = self._task_losses(out["decoder_logits"], out["query_index"], batch, sample_of_query)
            result["loss"] = total = total + self.config.likelihood_decoder_loss * alone
        if "likelihood_nll" in out and self.config.likelihood_fit > 0:
            result["loss"] = total = total + self.config.likelihood_fit * out["likelihood_nll"]
            result["likelihood_nll"] = out["likelihood_nll"].detach()
        if self.count_head is not None and "output_labels" in batch:
            nll = count_nll(self.count_head, self.unit_rows, batch, sample_of_query, latency=self.config.count_latency_s,
                            span=self.config.count_span_s, window_s=self.config.window_s)
            result["loss"] = total + self.config.count_loss * nll
            result["count_nll"] = nll.detach()
        return result

    def _task_losses(self, logits_by_task: dict[str, Tensor], query_index: dict[str, Tensor],
                     batch: dict[str, Tensor], sample_of_query: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum of the tasks' losses (``loss``'s weighting) and each task's mean, for these logits."""
        n_samples = batch["modality"].numel()
        weights = batch.get("output_weights")
        total = sum(x.sum() for x in logits_by_task.values()) * 0.0  # a graph-connected zero (no labels at all)
        task_loss = {}
        for task in self.config.tasks:
            rows, logits = query_index[task.name], logits_by_task[task.name]
            if rows.numel() == 0:
                continue
            w = weights[rows].float() if weights is not None else torch.ones(len(rows), device=logits.device)
            if task.kind == "classification":
                labels = batch["output_labels"][rows]
                w = w * (labels >= 0)
                per_query = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
            else:
                target = batch["output_values"][rows].float().reshape(logits.shape)
                per_query = F.mse_loss(logits, target, reduction="none").mean(-1)
            mean = (per_query * w).sum() / w.sum().clamp_min(1e-12)
            asking = torch.zeros(n_samples, device=logits.device).index_fill_(0, sample_of_query[rows][w > 0], 1.0)
            total = total + task.weight * mean * asking.sum() / n_samples
            task_loss[task.name] = mean.detach()
        return total, task_loss

    # -- finetuning ----------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, in the papers' unfreezing order for finetuning (App. C): unit and
        session embeddings, then the decoder (task embedding, cross-attention, heads), then the
        encoders and the trunk."""
        decoder = [self.task_emb.weight, *self.dec_attn.parameters(), *self.dec_ffn.parameters(),
                   *self.heads.parameters(), *(self.count_head.parameters() if self.count_head is not None else ()),
                   *(self.likelihood_head.parameters() if self.likelihood_head is not None else ())]
        own = [self.readout_emb.weight] if self.readout_emb is not None else []
        return {"embeddings": [self.unit_emb.weight, self.session_emb.weight, *own], "decoder": decoder,
                "encoder": [*(self.unit_up.parameters() if self.unit_up is not None else ()),
                            *self.encoders.parameters(), *self.trunk.parameters()]}


# ----------------------------------------------------------------------------- parameter counts


def n_parameters(model: nn.Module, *, embeddings: bool = True) -> int:
    """Parameter count; ``embeddings=False`` leaves out the unit/session vocabularies (which grow with
    the data, and are the same in every architecture variant)."""
    skip = set()
    if not embeddings and isinstance(model, MultiModalPOYO):
        skip = {id(p) for p in model.param_groups()["embeddings"]}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
