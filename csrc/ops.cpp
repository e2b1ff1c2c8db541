// Operator schemas of the gemma3_fast namespace (one TORCH_LIBRARY block). Kernels live in cpu/*.cpp and
// cuda/*.cu, registered per device with TORCH_LIBRARY_IMPL; the Python module itself is python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(gemma3_fast, m) {
  // Gemma RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (1 + weight), fp32 math.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // Sandwich-norm step: h = residual + rms_norm(x, post_weight); y = rms_norm(h, pre_weight). Returns (h, y).
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor post_weight, Tensor pre_weight, float eps) -> (Tensor, Tensor)");
  // Per-head RMSNorm of q [T,Hq,D] and k [T,Hk,D] (or [B,T,H,D], every row from position 0), then half-split
  // RoPE with cos/sin [T,D/2] (fp32) of the tokens' angles. Returns new contiguous (q, k); q/k rows may be strided views (e.g. of a fused qkv output).
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, "
        "float eps) -> (Tensor, Tensor)");
  // Writes k/v [T,Hk,D] into the preallocated caches [S,Hk,D] at slot p % S (ring) or p (linear).
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor positions, bool ring) -> ()");
  // Causal attention of q [T,Hq,D] at consecutive positions over the cached keys (before positions[0]) and the
  // new k/v [T,Hk,D]; window > 0 limits key j to i - j < window. Online softmax in fp32.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor positions, int window, "
        "float scale) -> Tensor");
  // y = x @ weight^T, weight [N,K] in fp32, bf16, or int8 with per-row fp32 scales [N]; fp32 accumulation,
  // output in x's dtype. Few tokens: bandwidth-bound AVX2 kernel; many: fp32 sgemm.
  // weight may also be GGUF blocks: uint8 [N, blocks, block_bytes] (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, told apart
  // by block_bytes), scales None; x @ dequantize(weight)^T with fp32 activations.
  m.def("linear(Tensor x, Tensor weight, Tensor? scales=None) -> Tensor");
  // GGUF blocks uint8 [N, blocks, block_bytes] -> fp32 [N, blocks * weights per block], as gguf.quants.dequantize.
  m.def("dequantize(Tensor blocks) -> Tensor");
  // Index (int64) of the largest value along the last dim, as torch.argmax(x, -1): the first among equals, NaN
  // above everything. Greedy decoding's pick over the vocabulary.
  m.def("argmax(Tensor x) -> Tensor");
  // One whole block, the composition of the ops above (reference_ops.decoder_layer is its specification):
  // y -> qkv -> qk_norm_rope -> attention (-> kv_cache_write) -> o -> add_rms_norm -> gated gelu-tanh MLP ->
  // add_rms_norm. h: residual stream [T, hidden]; y: h after this block's input norm.
  // weights = [qkv, o, gate_up, down] (q|k|v and gate|up fused by rows); scales: their int8 per-row scales or
  // None; norms = [q, k, post_attn, pre_ff, post_ff, next] where next is the following block's input norm (or
  // the final norm). Returns (h, y) for the next block.
  m.def("decoder_layer(Tensor h, Tensor y, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor[] weights, Tensor?[] scales, Tensor[] norms, int num_heads, int window, "
        "float scale, float eps, bool ring, bool write_cache) -> (Tensor, Tensor)");
  // All blocks in order, decoder_layer on each, in one call (a decode step's whole body). Per layer i:
  // rope[2i], rope[2i+1] (cos, sin), k_caches[i], v_caches[i], weights[4i:4i+4], scales[4i:4i+4],
  // norms[6i:6i+6], windows[i], ring[i]. Returns (h, y) after the last block.
  m.def("decoder_layers(Tensor h, Tensor y, Tensor positions, Tensor[] rope, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor[] weights, Tensor?[] scales, Tensor[] norms, int[] windows, bool[] ring, "
        "int num_heads, float scale, float eps, bool write_cache) -> (Tensor, Tensor)");
  // The whole forward (reference_ops.decoder_forward is its specification): the embedding rows of ids times
  // embed_scale (an int8 embed_weight is the tied int8 head: its rows times head_scales, in first_norm's dtype),
  // the first block's input norm, the RoPE tables of both bases at positions, decoder_layers, the
  // output head. Logits [T, vocab], or [1, vocab] for the last position unless all_logits.
  m.def("decoder_forward(Tensor ids, Tensor positions, Tensor embed_weight, float embed_scale, Tensor first_norm, "
        "Tensor inv_freq_local, Tensor inv_freq_global, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor[] weights, Tensor?[] scales, Tensor[] norms, int[] windows, bool[] ring, Tensor head_weight, "
        "Tensor? head_scales, int num_heads, float scale, float eps, bool write_cache, bool all_logits) -> Tensor");
  // One decode step of B sequences (reference_ops.decoder_forward_batched): ids[b] at positions[b], each sequence
  // over its own caches (sequence b's layer i: k_caches[b * layers + i]), its key and value written there.
  // Logits [B, vocab], each row the one decoder_forward gives that sequence alone (batch-invariant).
  m.def("decoder_forward_batched(Tensor ids, Tensor positions, Tensor embed_weight, float embed_scale, "
        "Tensor first_norm, Tensor inv_freq_local, Tensor inv_freq_global, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor[] weights, Tensor?[] scales, Tensor[] norms, int[] windows, bool[] ring, "
        "Tensor head_weight, Tensor? head_scales, int num_heads, float scale, float eps) -> Tensor");

  // -- training: the batched forward's extra ops and the backward of each fused op -------------------------
  // gelu_tanh(gate) * up of the fused gate|up projection output [..., 2I] -> [..., I], fp32 math.
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh_mul_backward(Tensor grad, Tensor gate_up) -> Tensor");
  // Causal (window > 0: sliding) attention of a training batch, q [B,T,Hq,D], k/v [B,T,Hk,D], each row a sequence
  // from position 0 and no cache. Returns (out [B,T,Hq,D], lse [B,T,Hq] fp32: each query's log-sum-exp of scores).
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, int window, float scale) -> (Tensor, Tensor)");
  // Rebuilds the probabilities from lse (no [T, T] matrix saved). Returns (grad_q, grad_k, grad_v).
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int window, float scale) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight).
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // h: add_rms_norm's first output. Returns (grad_x, grad_residual, grad_post_weight, grad_pre_weight).
  m.def("add_rms_norm_backward(Tensor grad_h, Tensor grad_y, Tensor x, Tensor h, Tensor post_weight, "
        "Tensor pre_weight, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // q/k as given to qk_norm_rope ([T,H,D] or [B,T,H,D]). Returns (grad_q, grad_k, grad_q_weight, grad_k_weight).
  m.def("qk_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, "
        "Tensor cos, Tensor sin, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // The training loss on a chunk of fp32 logits, transposed: logits_t [V, N], column n is token n's logits. In
  // place, each column becomes (softmax - one_hot(target)) * grad_scale (zero where target == ignore_index).
  // Returns the tokens' losses lse - logit[target] [N] (0 if ignored).
  m.def("softmax_cross_entropy_(Tensor(a!) logits_t, Tensor targets, float grad_scale, int ignore_index) -> Tensor");
}
