// Cross-check of the CPU kernels under one ISA (the test compiles this file with -march=haswell,
// x86-64-v2, ...): for rows of channels, the channels-as-lanes forward (bft/lanes.h) against the
// transposing tile kernels (bft/kernel.h with Options::lanes off), plain and with the epilogue,
// and the channels-as-lanes backward (bft/lanes_backward.h) against the tile backward.
// Prints one line per case and exits 1 on a mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bft/kernel.h"

namespace bft {
template BFT_RUN_TABLE(float, kPlain)
template BFT_RUN_TABLE(double, kPlain)
template BFT_RUN_TABLE(float, kClamp)
template BFT_RUN_TABLE(float, kSwish)
}  // namespace bft

using namespace bft;

int main() {
  struct Case { int64_t cin, cout, rows; std::vector<int64_t> radices; };
  const std::vector<Case> cases = {
      {256, 256, 300, {4, 4, 4, 4}}, {128, 128, 77, {4, 4, 4, 2}}, {48, 160, 33, {4, 4, 4}},
      {160, 48, 33, {4, 4, 4}},      {64, 64, 5, {2, 2, 4, 4}},    {32, 32, 1, {2, 2, 2, 2, 2}},
      {512, 512, 40, {4, 4, 4, 4, 2}}, {1024, 1024, 9, {4, 4, 4, 4, 4}},
      {80, 80, 50, {5, 4, 4}},       {144, 144, 33, {3, 3, 4, 4}}, {160, 320, 20, {5, 4, 4, 2}},
      {288, 48, 17, {3, 4, 4}}};
  std::mt19937 g(1);
  std::normal_distribution<float> d;
  int bad = 0;
  for (const Case& c : cases) {
    Plan pl;
    if (!make_plan(c.cin, c.cout, c.radices.data(), c.radices.size(), true, pl).empty()) return 2;
    std::vector<float> x(c.rows * c.cin), w(pl.T * pl.W), add(c.rows * c.cout), mul(c.cout),
        bias(c.cout), tiles(c.rows * c.cout), lanes(c.rows * c.cout);
    for (auto* v : {&x, &w, &add, &mul, &bias})
      for (auto& e : *v) e = d(g);
    for (auto& e : w) e *= 0.5f;
    const Epilogue<float> ep{mul.data(), bias.data(), 0.f, 6.f, false};
    for (int form = 0; form < 2; ++form) {
      for (bool use_lanes : {false, true}) {
        Options opt;
        opt.lanes = use_lanes;
        float* y = use_lanes ? lanes.data() : tiles.data();
        if (form == 0) forward_impl<float, float>(pl, x.data(), w.data(), y, c.rows, 1, opt);
        else forward_impl<float, float, true>(pl, x.data(), w.data(), y, c.rows, 1, opt, &ep,
                                              add.data());
      }
      double err = 0, scale = 0;
      for (size_t i = 0; i < tiles.size(); ++i) {
        err = std::max(err, (double)std::fabs(tiles[i] - lanes[i]));
        scale = std::max(scale, (double)std::fabs(tiles[i]));
      }
      const bool ok = err <= 2e-5 * (1 + scale);
      bad += !ok;
      std::printf("%s %ld->%ld rows %ld %s: max |diff| %.3g (max |y| %.3g)\n", ok ? "ok" : "MISMATCH",
                  (long)c.cin, (long)c.cout, (long)c.rows, form ? "epilogue" : "plain", err, scale);
    }
    // the backward: input and weight gradients (add stands in for the output gradient)
    std::vector<float> gx[2] = {std::vector<float>(x.size()), std::vector<float>(x.size())};
    std::vector<float> gw[2] = {std::vector<float>(w.size()), std::vector<float>(w.size())};
    for (int use_lanes : {0, 1}) {
      Options opt;
      opt.lanes = use_lanes;
      backward_impl<float, float>(pl, add.data(), x.data(), w.data(), gx[use_lanes].data(),
                                  gw[use_lanes].data(), c.rows, 1, opt);
    }
    double err = 0, scale = 0;
    for (const auto* pair : {gx, gw})
      for (size_t i = 0; i < pair[0].size(); ++i) {
        err = std::max(err, (double)std::fabs(pair[0][i] - pair[1][i]));
        scale = std::max(scale, (double)std::fabs(pair[0][i]));
      }
    const bool ok = err <= 2e-5 * (1 + scale);
    bad += !ok;
    std::printf("%s %ld->%ld rows %ld backward: max |diff| %.3g (max |grad| %.3g)\n",
                ok ? "ok" : "MISMATCH", (long)c.cin, (long)c.cout, (long)c.rows, err, scale);
  }
  return bad ? 1 : 0;
}
