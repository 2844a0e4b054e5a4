/* hetflow: wait for a flag word without holding the Python interpreter lock (called through ctypes). */
#include <stdint.h>
#include <time.h>
#include <sched.h>
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec + t.tv_nsec*1e-9;}
/* Spin until *word == value (returns 0), == -1 (returns -1) or timeout_s passes (returns 1).
   After a short pure spin it yields the core at each poll: with more runnable threads than cores
   (a simulated device, ONNX Runtime's pool) a waiter that never yields starves the producer it waits for. */
int hetflow_wait_flag(volatile int64_t *word, int64_t value, double timeout_s, double *seen_at) {
    double start = now();
    unsigned n = 0;
    for (;;) {
        int64_t w = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if (w == value) { *seen_at = now(); return 0; }
        if (w == -1) return -1;
        if (n > 4096) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
        if ((++n & 255) == 0 && now() - start > timeout_s) return 1;
    }
}
