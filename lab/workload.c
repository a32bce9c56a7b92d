/*
 * vmbalance lab guest workload: a CPU burner and a memory hog, built static into the guest's
 * initramfs. The guest's /init runs one instance at a time and replaces it when the host sends a
 * new command on the control serial port.
 *
 *   workload cpu THREADS DUTY_PCT        burn THREADS threads, each busy DUTY_PCT % of every 100 ms
 *   workload mem RATE_MIB_S SIZE_MIB HOLD_S
 *                                        allocate and touch RATE_MIB_S MiB/s up to SIZE_MIB, hold it
 *                                        HOLD_S seconds (0: forever), then free it all and idle
 *   workload idle                        do nothing until killed
 *
 * Progress goes to stdout (the guest console) as "workload: ..." lines. It runs at nice 10.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_s(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static int duty_pct = 100;

static void *burn(void *arg) {
    (void)arg;
    volatile unsigned long x = 0;
    const double slot = 0.1;
    for (;;) {
        double start = now_s();
        double busy = slot * duty_pct / 100.0;
        while (now_s() - start < busy) x++;
        sleep_s(slot - busy);
    }
    return NULL;
}

static int cpu(int threads, int duty) {
    duty_pct = duty < 0 ? 0 : duty > 100 ? 100 : duty;
    printf("workload: cpu %d threads at %d%%\n", threads, duty_pct);
    fflush(stdout);
    for (int i = 1; i < threads; i++) {
        pthread_t t;
        pthread_create(&t, NULL, burn, NULL);
    }
    if (threads > 0) burn(NULL);
    for (;;) pause();
}

static int mem(double rate_mib_s, long size_mib, double hold_s) {
    const size_t chunk = 1 << 20;
    char **chunks = calloc(size_mib > 0 ? size_mib : 1, sizeof(char *));
    long held = 0, shown = 0;
    double start = now_s();
    printf("workload: mem %.1f MiB/s up to %ld MiB, hold %.0f s\n", rate_mib_s, size_mib, hold_s);
    fflush(stdout);
    while (held < size_mib) {
        long due = (long)((now_s() - start) * rate_mib_s);
        while (held < due && held < size_mib) {
            char *p = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                printf("workload: mmap failed at %ld MiB\n", held);
                fflush(stdout);
                sleep_s(0.1);
                continue;
            }
            for (size_t off = 0; off < chunk; off += 4096) p[off] = (char)(off + held);
            chunks[held++] = p;
        }
        if (held >= shown + 64) {
            shown = held;
            printf("workload: holding %ld MiB\n", held);
            fflush(stdout);
        }
        sleep_s(0.05);
    }
    printf("workload: reached %ld MiB\n", held);
    fflush(stdout);
    if (hold_s <= 0) for (;;) pause();
    sleep_s(hold_s);
    for (long i = 0; i < held; i++) munmap(chunks[i], chunk);
    printf("workload: freed %ld MiB\n", held);
    fflush(stdout);
    for (;;) pause();
}

int main(int argc, char **argv) {
    /* Below the guest's control loop, so a busy guest still reacts to the next command. */
    setpriority(PRIO_PROCESS, 0, 10);
    if (argc >= 4 && strcmp(argv[1], "cpu") == 0 && argc == 4) return cpu(atoi(argv[2]), atoi(argv[3]));
    if (argc == 5 && strcmp(argv[1], "mem") == 0) return mem(atof(argv[2]), atol(argv[3]), atof(argv[4]));
    if (argc == 2 && strcmp(argv[1], "idle") == 0) for (;;) pause();
    fprintf(stderr, "usage: workload cpu THREADS DUTY_PCT | mem RATE_MIB_S SIZE_MIB HOLD_S | idle\n");
    return 2;
}
