/* One instruction set's instantiation (CIN_IT, CIN_UT: the signed and unsigned integer types of CIN_T's size, for the lane
 * masks of the activations; CIN_EXP/ERF/TANH: libm in CIN_T's precision): expects CIN_ISA (name suffix), CIN_VEC_BYTES and, for
 * non-temporal stores, CIN_STREAM_f / CIN_STREAM_d; undefines them at the end. */
#define CIN_T float
#define CIN_TS f
#define CIN_IT int32_t
#define CIN_UT uint32_t
#define CIN_EXP expf
#define CIN_ERF erff
#define CIN_TANH tanhf
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_TS
#undef CIN_IT
#undef CIN_UT
#undef CIN_EXP
#undef CIN_ERF
#undef CIN_TANH

#define CIN_T double
#define CIN_TS d
#define CIN_IT int64_t
#define CIN_UT uint64_t
#define CIN_EXP exp
#define CIN_ERF erf
#define CIN_TANH tanh
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_TS
#undef CIN_IT
#undef CIN_UT
#undef CIN_EXP
#undef CIN_ERF
#undef CIN_TANH

#undef CIN_ISA
#undef CIN_VEC_BYTES
#undef CIN_STREAM_f
#undef CIN_STREAM_d
