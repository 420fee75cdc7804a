// Cross-check of the depthwise convolution kernels under one ISA (the test compiles this file with
// dw_any.cpp, dw_k3_forward.cpp and dw_k3_backward.cpp for -march=haswell, x86-64-v2, ...): the
// forward (output, with a bias and an activation) and the backward (input, weight and bias
// gradients) of both layouts, against a direct loop in double. The shapes have row lengths that
// leave every tail length of a vector, both strides and the compiled (k = 3) and generic kernels,
// so the masked loads and stores of a tail run under the ISA that built them. Prints one line
// per case and exits 1 on a mismatch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "depthwise/dw_ops.h"

using namespace dwconv;

namespace {

double act_ref(double v, int act) {
  switch (act) {
    case kRelu: return std::max(v, 0.0);
    case kRelu6: return std::min(std::max(v, 0.0), 6.0);
    default: return v;
  }
}

// Index of (n, c, h, w) in a tensor of C channels and H x W pixels, NCHW or channels-last.
int64_t at(bool cl, int64_t C, int64_t H, int64_t W, int64_t n, int64_t c, int64_t h, int64_t w) {
  return cl ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

double max_diff(const std::vector<double>& want, const std::vector<double>& got, double* scale) {
  double err = 0;
  *scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(want[i] - got[i]));
    *scale = std::max(*scale, std::fabs(want[i]));
  }
  return err;
}

template <class A>
int check(const Shape& sh, bool cl, int act, std::mt19937& gen) {
  std::normal_distribution<double> d;
  const int64_t KK = sh.K * sh.K, nx = sh.N * sh.C * sh.H * sh.W, ny = sh.N * sh.C * sh.Ho * sh.Wo;
  std::vector<A> x(nx), w(sh.C * KK), b(sh.C), g(ny), y(ny), gx(nx), gw(sh.C * KK), gb(sh.C);
  for (auto* v : {&x, &w, &b, &g})
    for (auto& e : *v) e = (A)d(gen);
  std::vector<double> y_ref(ny), gx_ref(nx, 0.0), gw_ref(sh.C * KK, 0.0), gb_ref(sh.C, 0.0);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t c = 0; c < sh.C; ++c)
      for (int64_t oh = 0; oh < sh.Ho; ++oh)
        for (int64_t ow = 0; ow < sh.Wo; ++ow) {
          const int64_t o = at(cl, sh.C, sh.Ho, sh.Wo, n, c, oh, ow);
          double s = b[c];
          for (int kh = 0; kh < sh.K; ++kh)
            for (int kw = 0; kw < sh.K; ++kw) {
              const int64_t ih = oh * sh.S + kh - sh.P(), iw = ow * sh.S + kw - sh.P();
              if (ih < 0 || ih >= sh.H || iw < 0 || iw >= sh.W) continue;
              const int64_t i = at(cl, sh.C, sh.H, sh.W, n, c, ih, iw);
              s += (double)x[i] * w[c * KK + kh * sh.K + kw];
              gx_ref[i] += (double)g[o] * w[c * KK + kh * sh.K + kw];
              gw_ref[c * KK + kh * sh.K + kw] += (double)g[o] * x[i];
            }
          y_ref[o] = act_ref(s, act);
          gb_ref[c] += g[o];
        }
  forward<A>(sh, cl, x.data(), w.data(), b.data(), act, y.data(), 2);
  backward<A>(sh, cl, g.data(), x.data(), w.data(), gx.data(), gw.data(), gb.data(), 2);
  const char* what[] = {"y", "gx", "gw", "gb"};
  const std::vector<double>* want[] = {&y_ref, &gx_ref, &gw_ref, &gb_ref};
  const std::vector<A>* got[] = {&y, &gx, &gw, &gb};
  int bad = 0;
  for (int i = 0; i < 4; ++i) {
    double scale;
    const double err = max_diff(*want[i], std::vector<double>(got[i]->begin(), got[i]->end()),
                                &scale);
    const double tol = (sizeof(A) == 4 ? 1e-4 : 1e-10) * (1 + scale);
    const bool ok = err <= tol;
    bad += !ok;
    std::printf("%s %s %s N%ld C%ld %ldx%ld k%d s%d act%d %s: max |diff| %.3g (max %.3g)\n",
                ok ? "ok" : "MISMATCH", sizeof(A) == 4 ? "float" : "double", cl ? "CL" : "NCHW",
                (long)sh.N, (long)sh.C, (long)sh.H, (long)sh.W, sh.K, sh.S, act, what[i], err,
                scale);
  }
  return bad;
}

}  // namespace

int main() {
  std::mt19937 gen(1);
  int bad = 0, cases = 0;
  // widths 1-17 and 23 leave every tail of 4, 8 and 16 lanes; 3 and 13 channels do the same
  // across the channels-last vectors
  for (int64_t W : {1, 2, 3, 5, 7, 9, 12, 17, 23})
    for (int K : {3, 5})
      for (int S : {1, 2})
        for (bool cl : {false, true}) {
          const int64_t C = cl ? 13 : 3, H = W % 4 + 2;
          bad += check<float>(shape_of(2, C, H, W, K, S), cl, K == 3 ? kRelu6 : kNone, gen);
          ++cases;
        }
  // channels-last images cut into strips and groups of channel blocks, the last one partial
  for (int S : {1, 2}) {
    bad += check<float>(shape_of(3, 37, 41, 29, 3, S), true, kRelu, gen);
    bad += check<float>(shape_of(1, 300, 9, 7, 3, S), true, kNone, gen);
    cases += 2;
  }
  bad += check<double>(shape_of(2, 5, 6, 11, 3, 1), false, kRelu, gen);
  bad += check<double>(shape_of(2, 5, 6, 11, 3, 2), true, kNone, gen);
  std::printf("%d cases, %d mismatches\n", cases + 2, bad);
  return bad ? 1 : 0;
}
