// Batch norm in training mode with the activation after it (ReLU, ReLU6 or none), channels-last, forward and
// backward in the fewest passes over memory.
//
// Forward: one pass sums x and x^2 per channel, one writes y = act(x * scale + shift) (PyTorch: its two passes,
// then one more for the activation). Backward: the activation's derivative is recomputed from x, so one pass
// sums g = dy * act'(pre) and g * x per channel and one writes dx = g * k1 + x * k2 + k3 (PyTorch: a pass for the
// activation's gradient, then its two).

#include "common.h"

#include <vector>

namespace sepconv_cpu {

namespace {

using V = Vectorized<float>;
constexpr int64_t L = V::size();

// The activation's derivative (1 or 0) at pre-activation values, as PyTorch's backward formulas have it.
inline V slope(const V& pre, Act act) {
  const V one(1.0f), zero(0.0f);
  switch (act) {
    case Act::ReLU: return V::blendv(zero, one, pre > zero);
    case Act::ReLU6: return V::blendv(zero, one, (pre > zero) & (pre < V(6.0f)));
    default: return one;
  }
}

// Per channel, over all rows: sums[c] += f(row, c) for two functions at once, in double between blocks of rows.
template <typename F>
void channel_sums(int64_t rows, int64_t C, std::vector<double>& first, std::vector<double>& second, const F& f) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(2 * threads * C, 0.0);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + 2 * at::get_thread_num() * C;
    std::vector<float> block(2 * C);
    for (int64_t r0 = begin; r0 < end; r0 += 256) {  // float sums over at most 256 rows, then into double
      std::fill(block.begin(), block.end(), 0.0f);
      const int64_t r1 = std::min(end, r0 + 256);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          V a, b;
          f(r, c, L, a, b);
          (V::loadu(block.data() + c) + a).store(block.data() + c);
          (V::loadu(block.data() + C + c) + b).store(block.data() + C + c);
        }
        if (c < C) {
          V a, b;
          f(r, c, C - c, a, b);
          (V::loadu(block.data() + c, C - c) + a).store(block.data() + c, C - c);
          (V::loadu(block.data() + C + c, C - c) + b).store(block.data() + C + c, C - c);
        }
      }
      for (int64_t i = 0; i < 2 * C; ++i) mine[i] += block[i];
    }
  });
  first.assign(C, 0.0);
  second.assign(C, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) {
      first[c] += partial[2 * t * C + c];
      second[c] += partial[2 * t * C + C + c];
    }
}

inline V load(const float* p, int64_t n) { return n == L ? V::loadu(p) : V::loadu(p, n); }

inline void store(const V& v, float* p, int64_t n) {
  if (n == L) v.store(p);
  else v.store(p, n);
}

// Each row's channels [c, c + n) through f(row, c, n), in parallel over rows.
template <typename F>
void each_vector(int64_t rows, int64_t C, const F& f) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t c = 0;
      for (; c + L <= C; c += L) f(r, c, L);
      if (c < C) f(r, c, C - c);
    }
  });
}

// Channels-last in 2-D or 3-D: either way rows of C values, which is all the kernels read.
at::MemoryFormat channels_last_of(const at::Tensor& x) {
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK((x.dim() == 4 || x.dim() == 5) && x.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(channels_last_of(x)),
              "sepconv cpu batch_norm_act: x must be a channels-last 4-D or 5-D float32 CPU tensor; got ", x.sizes(),
              " ", x.scalar_type());
}

}  // namespace

// y = act(batch_norm(x)) with the batch's statistics; returns y, the batch mean and 1 / sqrt(var + eps) (biased
// variance), which the backward and the running statistics need.
std::vector<at::Tensor> batch_norm_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                               double eps, int64_t activation) {
  check_input(x);
  const Act act = read_activation(activation, 1.0).kind;
  const int64_t C = x.size(1), rows = x.numel() / C;
  const float* data = x.data_ptr<float>();
  // sums of x - x0 and its square, x0 the first row: far less cancellation in the variance than raw sums
  std::vector<double> sum, squares;
  channel_sums(rows, C, sum, squares, [&](int64_t r, int64_t c, int64_t n, V& a, V& b) {
    a = load(data + r * C + c, n) - load(data + c, n);
    b = a * a;
  });
  auto mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  auto scale = at::empty({C}, x.options());
  const auto w = weight.contiguous(), b = bias.contiguous();
  for (int64_t c = 0; c < C; ++c) {
    const double shifted = sum[c] / rows, m = data[c] + shifted;
    const double var = std::max(0.0, squares[c] / rows - shifted * shifted);
    const double is = 1.0 / std::sqrt(var + eps), gamma = w.data_ptr<float>()[c];
    mean.data_ptr<float>()[c] = static_cast<float>(m);
    invstd.data_ptr<float>()[c] = static_cast<float>(is);
    scale.data_ptr<float>()[c] = static_cast<float>(gamma * is);
  }
  auto y = empty_output(x.sizes(), x.options().memory_format(channels_last_of(x)));
  float* out = y.data_ptr<float>();
  // (x - mean) * scale + beta: x * scale + (beta - mean * scale) would cancel where |mean| >> the spread
  const float *sc = scale.data_ptr<float>(), *mu = mean.data_ptr<float>(), *beta = b.data_ptr<float>();
  each_vector(rows, C, [&](int64_t r, int64_t c, int64_t n) {
    const V pre = at::vec::fmadd(load(data + r * C + c, n) - load(mu + c, n), load(sc + c, n), load(beta + c, n));
    store(activate(pre, act, 0.0f), out + r * C + c, n);
  });
  return {y, mean, invstd};
}

// Gradients of x, weight and bias from dy, with the forward's x, mean and invstd.
std::vector<at::Tensor> batch_norm_act_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& bias, const at::Tensor& mean,
                                                const at::Tensor& invstd, int64_t activation) {
  check_input(x);
  const auto dy = dy_in.contiguous(channels_last_of(x));
  const Act act = read_activation(activation, 1.0).kind;
  const int64_t C = x.size(1), rows = x.numel() / C;
  const float *data = x.data_ptr<float>(), *grad = dy.data_ptr<float>();
  const auto w = weight.contiguous(), b = bias.contiguous();
  std::vector<float> scale(C);
  for (int64_t c = 0; c < C; ++c) scale[c] = w.data_ptr<float>()[c] * invstd.data_ptr<float>()[c];
  const float *mu = mean.data_ptr<float>(), *beta = b.data_ptr<float>();
  // g = dy * act'(pre), pre recomputed as the forward did; xc = x - mean. Sums of g and of g * xc per channel.
  const auto g = [&](int64_t r, int64_t c, int64_t n, V& xc) {
    xc = load(data + r * C + c, n) - load(mu + c, n);
    const V gv = load(grad + r * C + c, n);
    if (act == Act::None) return gv;
    return gv * slope(at::vec::fmadd(xc, load(scale.data() + c, n), load(beta + c, n)), act);
  };
  std::vector<double> sum_g, sum_gx;
  channel_sums(rows, C, sum_g, sum_gx, [&](int64_t r, int64_t c, int64_t n, V& a, V& b) {
    V xc;
    a = g(r, c, n, xc);
    b = a * xc;
  });
  auto dweight = at::empty({C}, x.options()), dbias = at::empty({C}, x.options());
  std::vector<float> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = invstd.data_ptr<float>()[c];
    const double dgamma = is * sum_gx[c];  // sum of g * x_hat
    dweight.data_ptr<float>()[c] = static_cast<float>(dgamma);
    dbias.data_ptr<float>()[c] = static_cast<float>(sum_g[c]);
    // dx = scale * (g - sum_g / P - x_hat * dgamma / P), x_hat = (x - mean) * invstd
    const double s = scale[c];
    k1[c] = static_cast<float>(s);
    k2[c] = static_cast<float>(-s * is * dgamma / rows);
    k3[c] = static_cast<float>(-s * sum_g[c] / rows);
  }
  auto dx = empty_output(x.sizes(), x.options().memory_format(channels_last_of(x)));
  float* out = dx.data_ptr<float>();
  each_vector(rows, C, [&](int64_t r, int64_t c, int64_t n) {
    V xc;
    const V gv = g(r, c, n, xc);
    const V rest = at::vec::fmadd(xc, load(k2.data() + c, n), load(k3.data() + c, n));
    store(at::vec::fmadd(gv, load(k1.data() + c, n), rest), out + r * C + c, n);
  });
  return {dx, dweight, dbias};
}

}  // namespace sepconv_cpu
