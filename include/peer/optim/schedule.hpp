// SPDX-License-Identifier: MIT
#ifndef PEER_OPTIM_SCHEDULE_HPP
#define PEER_OPTIM_SCHEDULE_HPP

/// \file
/// Learning-rate schedules: lr(step) = base_lr * factor(step), step = 1 for the first update.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "peer/core/error.hpp"

namespace peer {

/// The shape of a learning-rate schedule.
enum class ScheduleKind {
  kConstant,  ///< factor 1
  kWarmup,    ///< linear warm-up from 1 / warmup_steps to 1 over warmup_steps, then 1
  kCosine,    ///< linear warm-up, then cosine decay from 1 to min_factor at total_steps (held after)
};

/// factor(step) for step >= 1:
///   warm-up (step <= warmup_steps):  step / warmup_steps
///   cosine after warm-up:            min + (1 - min) (1 + cos(pi p)) / 2,
///                                    p = min(1, (step - warmup) / (total - warmup))
struct LrSchedule {
  ScheduleKind kind = ScheduleKind::kConstant;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 0;  ///< kCosine: the step at which the decay reaches min_factor
  double min_factor = 0.0;       ///< kCosine: final factor, in [0, 1]

  static LrSchedule constant() { return {}; }
  static LrSchedule warmup(std::int64_t steps) { return {ScheduleKind::kWarmup, steps, 0, 0.0}; }
  static LrSchedule cosine(std::int64_t warmup, std::int64_t total, double min_factor = 0.0) {
    return {ScheduleKind::kCosine, warmup, total, min_factor};
  }

  void validate(const std::string& where) const {
    if (warmup_steps < 0) detail::throw_invalid(where + ".warmup_steps", warmup_steps, "must be >= 0");
    if (kind == ScheduleKind::kCosine) {
      if (total_steps <= warmup_steps) {
        detail::throw_invalid(where + ".total_steps", total_steps,
                              "must be > warmup_steps = " + detail::to_text(warmup_steps) + " for a cosine schedule");
      }
      if (!(min_factor >= 0.0 && min_factor <= 1.0)) detail::throw_invalid(where + ".min_factor", min_factor, "must be in [0, 1]");
    }
  }

  double factor(std::int64_t step) const {
    if (kind == ScheduleKind::kConstant) return 1.0;
    if (warmup_steps > 0 && step <= warmup_steps) return static_cast<double>(step) / static_cast<double>(warmup_steps);
    if (kind == ScheduleKind::kWarmup) return 1.0;
    const double p = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps));
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * p));
  }
};

}  // namespace peer

#endif  // PEER_OPTIM_SCHEDULE_HPP
