#include "step-runner/base/malloc_tuning.h"

#include <malloc.h>

namespace step_runner::base {

void KeepStreamingBuffersMapped() {
  // Allocations up to 4 MiB come from the heap (a log chunk and its serialised copy are ~1 MiB
  // each). Setting the threshold also turns off glibc's dynamic threshold, which would adapt only
  // after the first large free and still trim.
  ::mallopt(M_MMAP_THRESHOLD, 4 << 20);
  // An arena keeps up to 16 MiB free at its top before it returns memory: a few chunks in flight
  // per stream fit, and an idle process does not hold more than that per arena.
  ::mallopt(M_TRIM_THRESHOLD, 16 << 20);
}

}  // namespace step_runner::base
