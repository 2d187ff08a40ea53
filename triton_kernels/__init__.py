"""Triton kernels of fastunlearn, installed as ``fastunlearn.triton_kernels``.

Kernels and launchers only (tensors in, tensors out). Importing this package does not import
Triton; each kernel module does, so a machine without Triton can still import fastunlearn.

Modules:
    unlearn_rows  the row kernel (online softmax of policy and reference logits, NLL, KL,
                  d loss / d logits in place) and its launcher ``unlearn_rows_fwd``
    token_stats   ``token_stats_fwd`` / ``token_stats_bwd`` (per-token logp, logp_ref, KL and
                  their recompute backward); the loss itself runs in fastunlearn.losses.driver
    dw_accumulate fp32 dW (=|+=) dz^T h for the chunk loops (plain torch, no Triton)
    adamw_sr      the AdamW step with stochastic rounding for bf16 weights (``adamw_sr_fwd``)
    _variants     loads each kernel module in compiled and in interpreted form (CPU tensors)
"""
