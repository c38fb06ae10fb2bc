// The vocabulary shared by csrc/losses_cpu.cpp (the statistics pass) and csrc/losses_cpu_finalize.cpp (the formula
// on the statistics): the slots of fastmed/reference/loss_spec.py, in order (tests/test_losses_cpp.py checks them
// against loss_spec.SLOTS), and the parsing of a spec's mode names.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

namespace fastmed {
namespace loss_vocab {

enum Slot : int64_t { kIntersect, kPred, kGround, kDiff, kNll, kLogsum, kFocal, kFocalPos, kCount, kBad, kNumSlots };

// The enum value of the mode `value` of the field `spec`.`name` (ValueError naming it for an unknown mode).
template <typename E>
E pick(const std::string& value, const char* spec, const char* name,
       std::initializer_list<std::pair<const char*, E>> words) {
  for (const auto& w : words) {
    if (value == w.first) return w.second;
  }
  TORCH_CHECK_VALUE(false, spec, ".", name, ": unknown mode '", value, "'");
}

}  // namespace loss_vocab
}  // namespace fastmed
