#ifndef STEP_RUNNER_BASE_MALLOC_TUNING_H_
#define STEP_RUNNER_BASE_MALLOC_TUNING_H_

namespace step_runner::base {

// Keeps large streaming buffers (1 MiB log chunks, gRPC's serialised messages) on the heap and
// mapped between uses. Call once at the start of main() in programs that stream logs: the
// daemon and its clients.
//
// Why: with glibc's defaults every such allocation on a gRPC thread was a fresh mmap, or a heap
// grown and then trimmed again (madvise or brk) at its free, so each 1 MiB chunk cost ~500 page
// faults and a TLB shootdown on each side. On the VMs we run on a page fault is expensive:
// replaying a finished log ran at 0.1 of a pipe's speed (BENCHMARKS.md, fifth session).
void KeepStreamingBuffersMapped();

}  // namespace step_runner::base

#endif  // STEP_RUNNER_BASE_MALLOC_TUNING_H_
