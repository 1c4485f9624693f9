/* Pinning the calling thread's OpenMP team, one thread per CPU (vLLM-CPU does the same with
 * VLLM_CPU_OMP_THREADS_BIND): torch's parallel regions and the kernels here then always run
 * thread i on cpus[i], so a preempted or migrated worker does not stall the whole region.
 *
 * libgomp keeps one team per thread that opens parallel regions, so this must run on the
 * thread that computes (the engine's step thread), and it binds that thread to cpus[0]. */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>
#include <stdint.h>

/* Returns 0, or -1 when a thread could not be bound (e.g. a CPU outside the cgroup's set). */
int moeflow_bind_threads(const int32_t *cpus, int n)
{
    int failed = 0;
#pragma omp parallel num_threads(n) reduction(| : failed)
    {
        const int cpu = cpus[omp_get_thread_num() % n];
        cpu_set_t set;
        CPU_ZERO(&set);
        if (cpu < 0 || cpu >= CPU_SETSIZE) {
            failed = 1;
        } else {
            CPU_SET(cpu, &set);
            failed |= sched_setaffinity(0, sizeof(set), &set) != 0;
        }
    }
    return failed ? -1 : 0;
}

/* Undo: every thread of the team may run on any of the n CPUs given. */
int moeflow_unbind_threads(const int32_t *cpus, int n, int num_threads)
{
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int i = 0; i < n; i++)
            if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET(cpus[i], &set);
        failed |= sched_setaffinity(0, sizeof(set), &set) != 0;
    }
    return failed ? -1 : 0;
}
