// Talking-heads attention on the CPU, one image at a time inside a single OpenMP region.
//
// The Python path in cait/kernels/talking_heads.py runs the same steps on chunks of images,
// op by op. Each op there is small: split over threads, it pays a fork and a join; run on
// single-threaded worker threads, it competes with libgomp's team thread, which spins for
// a while after every region of the calling thread (docs/BENCHMARKS.md, "Threads"). Here
// `at::parallel_for` hands whole images to the threads of one region, so that thread works
// instead; every op inside runs single-threaded on data that stays in the core's cache
// (one image's attention tensor is H x N x N: 0.6 MB for cait_xxs24_224 in fp32). The
// steps and their order are those of the Python path (in fp16/bf16 the forward pass mixes
// and normalises in fp32, see `forward`); its docstrings say what each tensor is.
//
// Layouts: q, k, v, g_out, g_q, g_k, g_v are (B, H, N, hd) views (strided, into the qkv
// projection's output or its gradient); probs and logits are (B, H, N, N); the
// mixing-weight gradients are per image, (B, H, H), summed by the caller in image order so
// that the result does not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

namespace {

using at::Tensor;

// Runs body(lo, hi) over images [0, batch) on torch's intra-op threads, each thread with
// the caller's grad mode, inference mode and dispatch state.
template <class Body>
void for_images(int64_t batch, const Body& body) {
  at::ThreadLocalState state;
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard guard(state);
    body(lo, hi);
  });
}

// Softmax over the last dim into `out`; fp16/bf16 are accumulated in fp32.
void softmax_into(Tensor& out, const Tensor& z) {
  if (at::isReducedFloatingType(z.scalar_type())) {
    out.copy_(at::softmax(z, -1, at::kFloat));
  } else {
    at::_softmax_out(out, z, -1, false);
  }
}

// out[g] = sum_h w[g, h] t[h] for a contiguous (H, N, N) t; out is (H, N * N).
void mix_into(Tensor& out, const Tensor& w, const Tensor& t) {
  at::mm_out(out, w, t.view({t.size(0), -1}));
}

// In fp16/bf16 the logits' mixing, the softmax and the weights' mixing run in fp32 (the
// products with q, k and v stay in the input dtype): a (H, H) product with an inner size of
// H runs about twice as fast in fp32 as in bf16 here, and the softmax accumulates in fp32
// anyway. The kept probabilities are rounded to the input dtype.
void forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w_l,
             const Tensor& w_w, const Tensor& bias, Tensor& out,
             const std::optional<Tensor>& probs, const std::optional<Tensor>& logits) {
  TORCH_CHECK(q.device().is_cpu(), "cait::talking_heads_forward runs on the CPU");
  const int64_t H = q.size(1), N = q.size(2), hd = q.size(3);
  const bool reduced = at::isReducedFloatingType(q.scalar_type());
  const auto acc = reduced ? at::kFloat : q.scalar_type();  // mixing and softmax dtype
  const Tensor w_l_acc = w_l.to(acc), w_w_acc = w_w.to(acc);
  for_images(q.size(0), [&](int64_t lo, int64_t hi) {
    const auto opts = q.options(), acc_opts = opts.dtype(acc);
    Tensor z = at::empty({H, N, N}, opts), mixed = at::empty({H, N * N}, acc_opts),
           p = at::empty({H, N, N}, acc_opts), heads = at::empty({H, N, hd}, opts);
    Tensor z_acc, weights;  // the fp32 logits and the rounded weights, in fp16/bf16 only
    if (reduced) {
      z_acc = at::empty({H, N, N}, acc_opts);
      weights = at::empty({H, N, N}, opts);
    }
    for (int64_t i = lo; i < hi; ++i) {
      Tensor z_i = logits ? (*logits)[i] : z;
      at::bmm_out(z_i, q[i], k[i].transpose(1, 2));
      mix_into(mixed, w_l_acc, reduced ? z_acc.copy_(z_i) : z_i);
      Tensor p_i = probs && !reduced ? (*probs)[i] : p;
      at::_softmax_out(p_i, mixed.view({H, N, N}), -1, false);
      if (probs && reduced) (*probs)[i].copy_(p_i);
      mix_into(mixed, w_w_acc, p_i);  // the attention weights, without proj_w's bias
      Tensor w_i = mixed.view({H, N, N});
      at::bmm_out(heads, reduced ? weights.copy_(w_i) : w_i, v[i]);
      Tensor out_i = out[i];  // (N, H, hd)
      at::add_out(out_i, heads.permute({1, 0, 2}), bias[i]);
    }
  });
}

void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w_l,
              const Tensor& w_w, const Tensor& g_out, const std::optional<Tensor>& probs,
              const std::optional<Tensor>& logits, Tensor& g_q, Tensor& g_k, Tensor& g_v,
              Tensor& g_w_l, Tensor& g_w_w) {
  TORCH_CHECK(q.device().is_cpu(), "cait::talking_heads_backward runs on the CPU");
  const int64_t H = q.size(1), N = q.size(2), hd = q.size(3);
  const Tensor w_l_t = w_l.t(), w_w_t = w_w.t();
  for_images(q.size(0), [&](int64_t lo, int64_t hi) {
    const auto opts = q.options();
    Tensor a = at::empty({H, N, N}, opts), b = at::empty({H, N, N}, opts),
           z = at::empty({H, N, N}, opts), p = at::empty({H, N, N}, opts),
           heads = at::empty({H, N, hd}, opts);
    Tensor a2 = a.view({H, N * N}), b2 = b.view({H, N * N});
    for (int64_t i = lo; i < hi; ++i) {
      // without kept tensors (recompute), the logits and probabilities again
      Tensor z_i = logits ? (*logits)[i] : z, p_i = probs ? (*probs)[i] : p;
      if (!logits) at::bmm_out(z_i, q[i], k[i].transpose(1, 2));
      if (!probs) {
        mix_into(a2, w_l, z_i);
        softmax_into(p_i, a);
      }
      mix_into(a2, w_w, p_i);  // the weights (their bias term is the caller's)
      at::bmm_out(heads, a.transpose(1, 2), g_out[i]);
      g_v[i].copy_(heads);
      at::bmm_out(a, g_out[i], v[i].transpose(1, 2));  // the weights' gradient
      Tensor g_w_w_i = g_w_w[i], g_w_l_i = g_w_l[i];
      at::mm_out(g_w_w_i, a2, p_i.view({H, N * N}).t());
      at::mm_out(b2, w_w_t, a2);  // the probabilities' gradient
      at::_softmax_backward_data_out(a, b, p_i, -1, p_i.scalar_type());  // the logits'
      at::mm_out(g_w_l_i, a2, z_i.view({H, N * N}).t());
      at::mm_out(b2, w_l_t, a2);  // the raw logits' gradient
      at::bmm_out(heads, b, k[i]);
      g_q[i].copy_(heads);
      at::bmm_out(heads, b.transpose(1, 2), q[i]);
      g_k[i].copy_(heads);
    }
  });
}

}  // namespace

TORCH_LIBRARY(cait, m) {
  m.def(
      "talking_heads_forward(Tensor q, Tensor k, Tensor v, Tensor w_l, Tensor w_w, "
      "Tensor bias, Tensor(a!) out, Tensor(b!)? probs, Tensor(c!)? logits) -> ()");
  m.def(
      "talking_heads_backward(Tensor q, Tensor k, Tensor v, Tensor w_l, Tensor w_w, "
      "Tensor g_out, Tensor? probs, Tensor? logits, Tensor(a!) g_q, Tensor(b!) g_k, "
      "Tensor(c!) g_v, Tensor(d!) g_w_l, Tensor(e!) g_w_w) -> ()");
}

TORCH_LIBRARY_IMPL(cait, CPU, m) {
  m.impl("talking_heads_forward", &forward);
  m.impl("talking_heads_backward", &backward);
}
