/* The instruction-set level of a funnelrec C kernel, chosen at run time (included by each
 * kernel, which gets its own copy of this state): 0 portable C, 1 AVX2 + FMA, 2 AVX-512F
 * (and AVX-512BW where the kernel defines LEVELS_NEED_AVX512BW before including this).
 * funnelrec/kernels/native.py names them (LEVELS). Each kernel exports `<prefix>_level` and
 * `<prefix>_force_level` calling cpu_level and force_level.
 */
#ifndef FUNNELREC_LEVELS_H
#define FUNNELREC_LEVELS_H

static int forced_level = -1;

/* The level in force: the one forced, else the best the CPU supports. */
static int cpu_level(void) {
    if (forced_level >= 0) return forced_level;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
#ifdef LEVELS_NEED_AVX512BW
    const int bw = __builtin_cpu_supports("avx512bw");
#else
    const int bw = 1;
#endif
    if (__builtin_cpu_supports("avx512f") && bw) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

/* Force a level (tests); -1: the best the CPU supports. Returns the level now in force,
   or -1 if the CPU cannot run the one asked for (nothing changes then). */
static int force_level(int level) {
    const int saved = forced_level;
    forced_level = -1;
    if (level > cpu_level() || level < -1) {
        forced_level = saved;
        return -1;
    }
    forced_level = level;
    return cpu_level();
}

#endif
