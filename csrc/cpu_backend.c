// The portable build's stand-ins for the functions of ggml's CPU backend (ggml-cpu.h) that the package calls.
// That build links no CPU backend: ggml is built once per instruction set, each a libggml-cpu-*.so installed
// beside this extension, and the first call here has ggml load the best one this CPU runs (its own scoring,
// ggml_backend_load_all_from_path); each function then calls the loaded library's definition of itself.
// The native build (PYGGML_NATIVE) links ggml's CPU backend instead, and not this file.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml-cpu.h"

static void * variant;  // the loaded libggml-cpu-*.so (a dlopen handle), or NULL if none loaded
static pthread_once_t variant_once = PTHREAD_ONCE_INIT;
static ggml_log_callback outer_log;
static void * outer_log_data;

// ggml announces each library it loads; only its warnings and errors are passed on while loading.
static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) outer_log(level, text, outer_log_data);
}

static void load_variant(void) {
    Dl_info self, cpu;
    char dir[PATH_MAX] = ".";
    if (!dladdr((void *) load_variant, &self) || !self.dli_fname) return;
    const char * slash = strrchr(self.dli_fname, '/');
    if (slash) {
        if ((size_t) (slash - self.dli_fname) >= sizeof dir) return;
        memcpy(dir, self.dli_fname, slash - self.dli_fname);
        dir[slash - self.dli_fname] = '\0';
    }
    ggml_log_get(&outer_log, &outer_log_data);
    ggml_log_set(quiet_log, NULL);
    ggml_backend_load_all_from_path(dir);
    ggml_log_set(outer_log, outer_log_data);
    // The CPU registry is a static of the loaded library: dladdr names the file, which is open already.
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
    if (reg && dladdr(reg, &cpu) && cpu.dli_fname) variant = dlopen(cpu.dli_fname, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
}

// The loaded variant's definition of `name`, or NULL when no variant could be loaded.
static void * variant_fn(const char * name) {
    pthread_once(&variant_once, load_variant);
    return variant ? dlsym(variant, name) : NULL;
}

// NULL, as for a failed allocation, when no variant loads: the caller raises.
ggml_backend_t ggml_backend_cpu_init(void) {
    ggml_backend_t (*fn)(void) = variant_fn("ggml_backend_cpu_init");
    return fn ? fn() : NULL;
}

ggml_threadpool_t ggml_threadpool_new(struct ggml_threadpool_params * params) {
    ggml_threadpool_t (*fn)(struct ggml_threadpool_params *) = variant_fn("ggml_threadpool_new");
    return fn ? fn(params) : NULL;
}

// These take what only a loaded variant made (a backend, a thread pool), so the variant is there.
void ggml_threadpool_free(ggml_threadpool_t threadpool) {
    ((void (*)(ggml_threadpool_t)) variant_fn("ggml_threadpool_free"))(threadpool);
}

void ggml_backend_cpu_set_n_threads(ggml_backend_t backend_cpu, int n_threads) {
    ((void (*)(ggml_backend_t, int)) variant_fn("ggml_backend_cpu_set_n_threads"))(backend_cpu, n_threads);
}

void ggml_backend_cpu_set_threadpool(ggml_backend_t backend_cpu, ggml_threadpool_t threadpool) {
    ((void (*)(ggml_backend_t, ggml_threadpool_t)) variant_fn("ggml_backend_cpu_set_threadpool"))(backend_cpu,
                                                                                                  threadpool);
}

// Encoding weights needs no backend: without a variant, ggml-base's scalar loop gives the same halves.
void ggml_cpu_fp32_to_fp16(const float * x, ggml_fp16_t * y, int64_t n) {
    void (*fn)(const float *, ggml_fp16_t *, int64_t) = variant_fn("ggml_cpu_fp32_to_fp16");
    (fn ? fn : ggml_fp32_to_fp16_row)(x, y, n);
}
