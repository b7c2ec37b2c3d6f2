"""The Hutchinson estimate of the Hessian diagonal, lean enough for Llama-3.1-8B on one 80 GB GPU.

What it estimates. For the calibration loss L = (1/B) Σ_b L_b and the scored weights w, H_b = ∂²L_b/∂w²:

    diag(H) ≈ d = (1/(B·P)) Σ_b Σ_{p<P} z_p ⊙ (H_b z_p),     E[z zᵀ] = I,

unbiased for any probe distribution with E[z zᵀ] = I. Saliency: "abs" → |d|, "obd" → |½ · d · w²| (Optimal
Brain Damage's predicted loss increase when w → 0, ranked by magnitude, so non-negative), None → d itself.

Why not the textbook double backward. g = ∂L/∂w with create_graph=True, then H z = ∂(g·z)/∂w, holds a
weight-sized g, z and H z set next to the weights and the fp32 score buffers (at Llama-3.1-8B that does not fit
an 80 GB GPU; the planned and measured figures are in the README). This package gets H z without any
weight-sized set. How:

1. No weight gradient. For a Linear layer y = x Wᵀ (x: [N, in], N tokens) with output gradient δ = ∂L_b/∂y,
   g_W = δᵀx, so for any probe Z shaped like W

       <g_W, Z> = Σ_t δ_tᵀ Z x_t.

   Scored nn.Linear / GPT-2 Conv1D weights run through `ScoredLinear`. The first backward (create_graph)
   forms activation gradients only and records one `Probe` node s_W = <δᵀx, Z> per layer; a second
   backward of s = Σ_W s_W gives H z. The same graph serves every probe p: Z is looked up when the
   second backward reaches the node.
2. H z is folded where it is produced. W enters s twice: through the forward (y = x Wᵀ) and through the
   first backward (δ_in = δ W, `BackwardUse`). Each of the two nodes adds its share of z ⊙ (H z)_W into
   the fp32 score buffer itself and returns no gradient to W: autograd never holds a weight-sized partial
   H z waiting for W's second contribution.
3. Rank-1 Rademacher probes (`probe_tensor`): z = a ⊗ b with a, b independent ±1 vectors. Every entry is ±1
   with probability ½ and entries are pairwise independent, so E[z zᵀ] = I and each entry's variance,
   Σ_{j≠i} H_ij² / P, is exactly that of i.i.d. probes (it involves pairwise moments only; errors of entries
   sharing a row or column are correlated). The probe term then costs two matrix-vector products instead of
   two matmuls, and the fold z ⊙ (δᵀx) = (δ·a)ᵀ(x·b) is one `addmm_` into the buffer. probe_kind="iid"
   (the textbook i.i.d. z, regenerated per tensor) is kept as an option; it is slower (two matmuls per
   probe term).
4. Local recomputation (lean=True, `LEAN_PARTS`). What remains of a double backward's memory is the first
   backward's graph. The parts without scored weights, the SDPA attention core, RMSNorm, act(gate)·up of
   gated MLPs and the cross-entropy, run through `_LeanFwd` / `_LeanBwd` (the loss through `_CrossEntropy` /
   `_CEGrad` with its analytic second derivative): only their inputs and output gradient are kept between
   the two backwards; their internals (T×T fp32 attention probabilities, fp32 norm temporaries, the
   [T, vocab] softmax) are recomputed one layer at a time when the second backward reaches them. SDPA keeps
   its fused kernel for the forward and first-order parts and uses the math kernel only transiently, for
   the second-order recomputation of one layer.
5. Anything else scored (embeddings, norm weights, a weight tied between an Embedding and a Linear, Linear
   subclasses with their own forward, fused expert tensors) takes a generic route: a post-accumulate-grad
   hook turns its gradient (with graph) into a `GZ` node and frees it, and folds z ⊙ (H z) in the second
   backward. Correct, but autograd may hold such a parameter's H z partial sums.

Limits: eager attention keeps its T×T tensors (more memory, still fits at 8B); other fused attention
(flash_attention_2) is switched to eager for the duration (`double_backward_ready`); non-reentrant gradient
checkpointing works but saves nothing (the second backward needs the recomputed graph); torch.func,
reentrant checkpointing and torch.compile'd modules are untested. While it runs, `hessian_diagonal` patches
F.scaled_dot_product_attention and instance `forward`s, and restores them afterwards.

Files: probes (the probe draw), state (per-call buffers and folds), nodes (the fused route's autograd nodes),
recompute (local recomputation), loss (the cross-entropy with an analytic second derivative), patching (SDPA,
norms, gated MLPs, double-backward readiness), routing (which weights take the fused route), estimator.
"""

from __future__ import annotations

from .estimator import SALIENCIES, hessian_diagonal
from .loss import next_token_loss
from .patching import double_backward_ready
from .recompute import LEAN_PARTS
from .probes import DEFAULT_PROBE_KIND, PROBE_KINDS, probe_factors, probe_key, probe_tensor, rademacher
from .routing import fused_modules

__all__ = ["DEFAULT_PROBE_KIND", "LEAN_PARTS", "PROBE_KINDS", "SALIENCIES", "double_backward_ready", "fused_modules",
           "hessian_diagonal", "next_token_loss", "probe_factors", "probe_key", "probe_tensor", "rademacher"]
