// The activations of the fused kernels: the one list of their names and codes, shared by every
// kernel and binding. Order and names are those of the Python side's list (ACTIVATIONS of
// butterfly/ops/bft_fused.py): a code is the activation's index in it.
#pragma once

#include <string>
#include <string_view>

namespace activation {

enum Code : int { kNone = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3, kHardsigmoid = 4 };

inline constexpr int kCount = 5;
inline constexpr std::string_view kNames[kCount] = {"none", "relu", "relu6", "hardswish",
                                                    "hardsigmoid"};

// The code of `name`, or -1 when it is not in the list.
inline int code_of(std::string_view name) {
  for (int i = 0; i < kCount; ++i)
    if (kNames[i] == name) return i;
  return -1;
}

// "none, relu, relu6, hardswish, hardsigmoid": the names for an error message.
inline std::string name_list() {
  std::string s;
  for (int i = 0; i < kCount; ++i) (s += i ? ", " : "") += kNames[i];
  return s;
}

}  // namespace activation
