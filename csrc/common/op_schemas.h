// Operator schemas, shared by the one TORCH_LIBRARY(longtune) block (csrc/ops.cpp) and the
// emulator's mirror library (csrc/emu/ops_emu.cpp), so the two cannot drift apart.
#pragma once

// Fast Walsh-Hadamard transform over the last dimension: y = (x @ H_n) * scale, where
// H_n = kron(H_m, H_{2^k}) (see csrc/common/hadamard_factors.h). Accumulates in fp32 (fp64 for
// float64 input).
#define LT_SCHEMA_HADAMARD "hadamard_transform(Tensor x, float scale) -> Tensor"
// The transposed transform, y = (g @ H_n^T) * scale: the backward of hadamard_transform.
#define LT_SCHEMA_HADAMARD_BWD "hadamard_transform_backward(Tensor grad, float scale) -> Tensor"

// Rotated fake quantization (RoSTE): y = Q(R x) with R the orthonormal (block) Hadamard rotation
// over the last dimension (blocks of hadamard_size; <= 0: the whole row) when `rotate`, and Q a
// per-token / per-group, symmetric / asymmetric b-bit quantize-dequantize (csrc/common/quant.h).
#define LT_SCHEMA_FAKE_QUANT                                                                \
  "rotate_fake_quant(Tensor x, int bits, str granularity, int group_size, bool symmetric, " \
  "float clip_ratio, bool rotate, int hadamard_size, str ste_mode) -> Tensor"
// Straight-through backward: grad_x = R^T (mask * grad), mask = 1 (ste 'identity') or
// "x's code was inside the code range" (ste 'clip').
#define LT_SCHEMA_FAKE_QUANT_BWD                                                                  \
  "rotate_fake_quant_backward(Tensor grad, Tensor x, int bits, str granularity, int group_size, " \
  "bool symmetric, float clip_ratio, bool rotate, int hadamard_size, str ste_mode) -> Tensor"
// The integer side for export: (codes, scales, zeros); codes int8 (symmetric) or uint8
// (asymmetric) with x's shape, scales / zeros float32 of shape x.shape[:-1] + [groups].
#define LT_SCHEMA_QUANTIZE                                                                \
  "rotate_quantize(Tensor x, int bits, str granularity, int group_size, bool symmetric, " \
  "float clip_ratio, bool rotate, int hadamard_size) -> (Tensor, Tensor, Tensor)"

// SpIEL gather-only gradient of sparse deltas: for every flat index i = r * in_features + c,
// out[k] = sum_t grad_out[t, r] * x[t, c] (the dense dW = grad_out^T x is never formed).
// indices: int64, 1-D, strictly increasing, in [0, out_features * in_features).
#define LT_SCHEMA_SPARSE_DELTA_GRAD \
  "sparse_delta_grad(Tensor grad_out, Tensor x, Tensor indices, int in_features) -> Tensor"

// Fused AdamW over sparse deltas, in place: per element, with its own step count `age` (deltas
// regrown later start their bias correction afresh): age += 1; m = b1 m + (1 - b1) g;
// v = b2 v + (1 - b2) g^2; values -= lr (m / (1 - b1^age)) / (sqrt(v / (1 - b2^age)) + eps)
// + lr wd values (decoupled decay on the deltas only). values/grad: float dtype; m, v float32; age int32.
#define LT_SCHEMA_SPARSE_ADAMW                                                                                \
  "sparse_adamw_(Tensor(a!) values, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) age, " \
  "float lr, float beta1, float beta2, float eps, float weight_decay) -> ()"

// Block-sparse flash attention (S^2-Attn, SQA/GQA/MQA head maps, window / Lambda-mask); the mask is
// the parameter set of csrc/common/attn_mask.h, never a tensor. Batched: q (B, Nq, Hq, D),
// k/v (B, Nk, Hkv, D), key_padding_mask (B, Nk) bool or None; packed: cu_seqlens_q/_k (B+1) int32/64
// and q (Tq, Hq, D), k/v (Tk, Hkv, D). Returns out (.., H, D) with H = max(Hq, Hkv) in q's dtype and
// lse (B, H, Nq) / (H, Tq), float32 (float64 for float64 input). mask: the integer encoding of
// longtune.AttentionMask (AttentionMask.to_list(); layout MaskSlot in csrc/common/attn_mask.h:
// version, causal, s2_group_size, s2_mode, window_left, window_right, n_global, q_offset, kv_offset,
// head_offset, total_heads). softcap > 0: logit softcapping, every score s = softmax_scale * q.k
// becomes softcap * tanh(s / softcap) before the mask and the softmax (Gemma-2's
// attn_logit_softcapping); 0: off.
#define LT_SCHEMA_ATTN_FWD                                                                              \
  "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens_q, " \
  "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, int[] mask, "         \
  "float softcap=0.0) -> (Tensor, Tensor)"
// Its backward: (dq, dk, dv) with q's, k's and v's shapes and dtypes (P recomputed from lse).
#define LT_SCHEMA_ATTN_BWD                                                                       \
  "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, " \
  "Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "     \
  "int max_seqlen_k, float softmax_scale, int[] mask, float softcap=0.0) -> (Tensor, Tensor, Tensor)"
// The mask math of csrc/common/attn_mask.h on the host, for one sequence (nq queries, nk keys) and
// local output head `head` of `heads`: per query row (cols: per key column) the <= 2 visible index
// ranges as (n, 2, 2) int64 [[lo0, hi0], [lo1, hi1]] (empty ranges are [0, 0]); with tile > 0, the
// tile ranges touched by rows/cols [i0, i1) as (2, 2). Used by the FLOP counter (unmasked pairs) and
// by the mask tests. Not part of LT_FOR_EACH_SCHEMA: it has one CPU implementation, for every backend.
#define LT_SCHEMA_ATTN_MASK_RANGES                                                                     \
  "attention_mask_ranges(int nq, int nk, int head, int heads, int[] mask, bool cols=False, int i0=0, " \
  "int i1=0, int tile=0) -> Tensor"

// Fused linear + cross-entropy (logits never materialised): per row t of x (T, d) with weight
// (V, d), optional bias (V,), target (T,) int64: z = softcap > 0 ? softcap * tanh(l / softcap) : l
// with l = x W^T + b; loss_t = (1 - eps) (lse - z[target]) + eps (lse - mean z) + z_loss lse^2,
// 0 where target == ignore_index. With class_weight w (V,) (F.cross_entropy's `weight`):
// loss_t = (1 - eps) w[target] (lse - z[target]) + eps / V sum_c w_c (lse - z_c) + z_loss lse^2
// (the z-loss term is not weighted). Returns (loss per row, lse per row, argmax per row), loss and
// lse float32 (float64 for float64 input), argmax int64: the first column of the row's largest z
// (a NaN counts as the largest, as torch.argmax), taken in the same pass; the reduction is applied
// by the caller.
#define LT_SCHEMA_CROSS_ENTROPY_FWD                                                                   \
  "linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, " \
  "float label_smoothing, float z_loss, float softcap, Tensor? class_weight=None) -> (Tensor, Tensor, Tensor)"
// Its backward from per-row loss gradients: (dx, dweight, dbias) in x's / weight's / bias's dtype
// (dbias is empty without bias), logits recomputed tile by tile, fp32 accumulation. filter_eps > 0
// skips vocabulary tiles of a row block whose |d logits| are all below it (Cut Cross-Entropy's
// filter; 0 = exact).
#define LT_SCHEMA_CROSS_ENTROPY_BWD                                                                      \
  "linear_cross_entropy_bwd(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, Tensor target, "    \
  "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap, float filter_eps, " \
  "Tensor? class_weight=None) -> (Tensor, Tensor, Tensor)"

// Loss, lse and the gradients of sum_t grad_rows[t] * loss_t in one call: (loss, lse, dx, dweight,
// dbias, argmax), for reductions whose per-row loss weights are known before the backward (mean: 1/n, sum:
// 1). One pass on every backend: each block of rows' logits is formed once, kept (CPU: in the compute
// dtype; CUDA: as fp32 in a [rows, V] scratch, LT_LCE_DEVICE_ROWS rows at a time) and turned into d
// logits in place (no recompute: 3 GEMMs instead of the forward + backward's 4).
// weight_grad=False (a frozen head, e.g. under LoRA): no dweight / dbias GEMM, both come back empty.
// fp32_grads=True: dx / dweight / dbias come back in the compute dtype (float32; float64 for float64
// input), not rounded to the inputs' dtypes (for a caller that scales them before rounding once).
#define LT_SCHEMA_CROSS_ENTROPY_FWD_BWD                                                                   \
  "linear_cross_entropy_fwd_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor grad_rows, " \
  "int ignore_index, float label_smoothing, float z_loss, float softcap, bool weight_grad=True, "         \
  "Tensor? class_weight=None, bool fp32_grads=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// Applies F to every op schema above (used by both libraries).
#define LT_FOR_EACH_SCHEMA(F)     \
  F(LT_SCHEMA_HADAMARD);          \
  F(LT_SCHEMA_HADAMARD_BWD);      \
  F(LT_SCHEMA_FAKE_QUANT);        \
  F(LT_SCHEMA_FAKE_QUANT_BWD);    \
  F(LT_SCHEMA_QUANTIZE);          \
  F(LT_SCHEMA_SPARSE_DELTA_GRAD); \
  F(LT_SCHEMA_SPARSE_ADAMW);      \
  F(LT_SCHEMA_ATTN_FWD);          \
  F(LT_SCHEMA_ATTN_BWD);          \
  F(LT_SCHEMA_CROSS_ENTROPY_FWD); \
  F(LT_SCHEMA_CROSS_ENTROPY_BWD); \
  F(LT_SCHEMA_CROSS_ENTROPY_FWD_BWD)
