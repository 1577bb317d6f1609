"""Build-time only: declares the C functions pyggml_resnet calls and emits the cffi extension's C source.

cffi's out-of-line API mode compiles these declarations against ggml's real headers, so a wrong
prototype fails the build instead of corrupting memory at run time. CMake runs this file
(`python _ffi_build.py OUT.c`) and compiles the result together with ggml and csrc/.
The cdef is curated: only what the package uses, and nothing here knows about ResNet.
"""

import sys

import cffi

CDEF = r"""
enum ggml_type { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_I8, GGML_TYPE_BF16, ... };
enum ggml_status { GGML_STATUS_SUCCESS, ... };

struct ggml_tensor {
    enum ggml_type type;
    struct ggml_backend_buffer * buffer;
    int64_t ne[4];
    size_t nb[4];
    void * data;
    struct ggml_tensor * view_src;
    ...;
};
struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
struct ggml_context;
struct ggml_cgraph;
typedef struct ggml_backend * ggml_backend_t;
typedef struct ggml_backend_buffer * ggml_backend_buffer_t;
typedef struct ggml_backend_buffer_type * ggml_backend_buffer_type_t;
typedef struct ggml_gallocr * ggml_gallocr_t;
struct ggml_threadpool_params { int n_threads; uint32_t poll; ...; };
typedef struct ggml_threadpool * ggml_threadpool_t;

/* contexts, tensors, graphs */
struct ggml_context * ggml_init(struct ggml_init_params params);
void ggml_free(struct ggml_context * ctx);
size_t ggml_tensor_overhead(void);
size_t ggml_graph_overhead_custom(size_t size, bool grads);
int64_t ggml_blck_size(enum ggml_type type);
typedef uint16_t ggml_fp16_t;
typedef struct { uint16_t bits; } ggml_bf16_t;
void ggml_cpu_fp32_to_fp16(const float * x, ggml_fp16_t * y, int64_t n);
void ggml_cpu_fp16_to_fp32(const ggml_fp16_t * x, float * y, int64_t n);
void ggml_cpu_fp32_to_bf16(const float * x, ggml_bf16_t * y, int64_t n);
void ggml_cpu_bf16_to_fp32(const ggml_bf16_t * x, float * y, int64_t n);
size_t ggml_nbytes(const struct ggml_tensor * tensor);
bool ggml_is_contiguous(const struct ggml_tensor * tensor);
struct ggml_tensor * ggml_new_tensor_4d(struct ggml_context * ctx, enum ggml_type type,
                                        int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3);
struct ggml_tensor * ggml_set_name(struct ggml_tensor * tensor, const char * name);
void ggml_set_input(struct ggml_tensor * tensor);
void ggml_set_output(struct ggml_tensor * tensor);
struct ggml_cgraph * ggml_new_graph_custom(struct ggml_context * ctx, size_t size, bool grads);
void ggml_build_forward_expand(struct ggml_cgraph * cgraph, struct ggml_tensor * tensor);
int ggml_graph_n_nodes(struct ggml_cgraph * cgraph);
struct ggml_tensor * ggml_graph_node(struct ggml_cgraph * cgraph, int i);

/* operations */
struct ggml_tensor * ggml_add(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_add_inplace(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_sub(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_mul(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_div(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_sqrt(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_relu(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_relu_inplace(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_scale_bias(struct ggml_context * ctx, struct ggml_tensor * a, float s, float b);
struct ggml_tensor * ggml_soft_max(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_mean(struct ggml_context * ctx, struct ggml_tensor * a);
const char * ggml_version(void);
struct ggml_tensor * ggml_mul_mat(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b);
struct ggml_tensor * ggml_cont(struct ggml_context * ctx, struct ggml_tensor * a);
struct ggml_tensor * ggml_permute(struct ggml_context * ctx, struct ggml_tensor * a,
                                  int axis0, int axis1, int axis2, int axis3);
struct ggml_tensor * ggml_view_4d(struct ggml_context * ctx, struct ggml_tensor * a,
                                  int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                                  size_t nb1, size_t nb2, size_t nb3, size_t offset);
struct ggml_tensor * ggml_reshape_4d(struct ggml_context * ctx, struct ggml_tensor * a,
                                     int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3);

/* backends and allocation */
ggml_backend_t ggml_backend_cpu_init(void);
void ggml_backend_cpu_set_n_threads(ggml_backend_t backend_cpu, int n_threads);
void ggml_backend_cpu_set_threadpool(ggml_backend_t backend_cpu, ggml_threadpool_t threadpool);
struct ggml_threadpool_params ggml_threadpool_params_default(int n_threads);
ggml_threadpool_t ggml_threadpool_new(struct ggml_threadpool_params * params);
void ggml_threadpool_free(ggml_threadpool_t threadpool);
void ggml_backend_free(ggml_backend_t backend);
ggml_backend_buffer_type_t ggml_backend_get_default_buffer_type(ggml_backend_t backend);
ggml_backend_buffer_t ggml_backend_alloc_ctx_tensors(struct ggml_context * ctx, ggml_backend_t backend);
size_t ggml_backend_buffer_get_size(ggml_backend_buffer_t buffer);
void * ggml_backend_buffer_get_base(ggml_backend_buffer_t buffer);
void ggml_backend_buffer_free(ggml_backend_buffer_t buffer);
void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
enum ggml_status ggml_backend_graph_compute(ggml_backend_t backend, struct ggml_cgraph * cgraph);
ggml_gallocr_t ggml_gallocr_new(ggml_backend_buffer_type_t buft);
void ggml_gallocr_free(ggml_gallocr_t galloc);
bool ggml_gallocr_alloc_graph(ggml_gallocr_t galloc, struct ggml_cgraph * graph);

/* libc */
int madvise(void * addr, size_t length, int advice);

/* csrc/ */
#define OP_PARAM_INT_MAX ...
struct ggml_tensor * batch_repeat(struct ggml_context * ctx, struct ggml_tensor * v,
                                  struct ggml_tensor * like, int channel_dim);
struct ggml_tensor * gather_patches(struct ggml_context * ctx, struct ggml_tensor * x,
                                    int kh, int kw, int stride, int pad, int groups, int64_t k_pad,
                                    enum ggml_type type);
struct ggml_tensor * max_pool(struct ggml_context * ctx, struct ggml_tensor * x, int k, int stride, int pad);
struct ggml_tensor * mean_pool(struct ggml_context * ctx, struct ggml_tensor * x);
void q8_0_encode(const float * x, uint8_t * dst, int64_t n);
struct ggml_tensor * winograd_input(struct ggml_context * ctx, struct ggml_tensor * x);
struct ggml_tensor * winograd_output(struct ggml_context * ctx, struct ggml_tensor * m, struct ggml_tensor * x,
                                     struct ggml_tensor * bias, struct ggml_tensor * residual, int relu);
struct ggml_tensor * stack_batch(struct ggml_context * ctx, struct ggml_tensor ** srcs, int n);
struct ggml_tensor * quantize_u8(struct ggml_context * ctx, struct ggml_tensor * x, float x_scale, int x_zero,
                                 int path);
enum gemm_path { GEMM_AVX512, GEMM_AVX2, GEMM_AVX512_BF16, GEMM_INT8_AVX512_VNNI, GEMM_INT8_AVX2, GEMM_INT8_SCALAR,
                 GEMM_INT8_AVX_VNNI,
                 ... };
#define GEMM_INT8_K_MAX ...
int gemm_path_supported(int path);
int64_t gemm_cache_bytes(int level);
void gemm_set_cache_bytes(int level, int64_t bytes);
int64_t gemm_kc_bytes(void);
int gemm_folds_broadcasts(void);
void gemm_set_folds_broadcasts(int folded);
struct ggml_tensor * gemm_packed(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x,
                                 int64_t m, int kh, int stride, int pad, struct ggml_tensor * bias,
                                 struct ggml_tensor * residual, int relu, int path);
struct ggml_tensor * gemm_int8(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x, int64_t m,
                               int kh, int stride, int pad, struct ggml_tensor * scales, struct ggml_tensor * colsums,
                               float x_scale, int x_zero, struct ggml_tensor * bias, struct ggml_tensor * residual,
                               float r_scale, int r_zero, int relu, float y_scale, int y_zero, int path);
struct ggml_tensor * gemm_winograd(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * v,
                                   struct ggml_tensor * x, int64_t m, struct ggml_tensor * bias,
                                   struct ggml_tensor * residual, int relu, int path);
"""

SOURCE = r"""
#include <sys/mman.h>
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "batch_repeat.h"
#include "gemm.h"
#include "op_params.h"
#include "pool.h"
#include "patches.h"
#include "q8_0.h"
#include "quantize.h"
#include "stack.h"
#include "winograd.h"
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pyggml_resnet._ggml", SOURCE)

if __name__ == "__main__":
    ffibuilder.emit_c_code(sys.argv[1])
