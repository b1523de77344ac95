/* One instruction set's instantiation: expects CIN_ISA (name suffix), CIN_VEC_BYTES and, for
 * non-temporal stores, CIN_STREAM_f / CIN_STREAM_d; undefines them at the end. */
#define CIN_T float
#define CIN_TS f
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_TS

#define CIN_T double
#define CIN_TS d
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_TS

#undef CIN_ISA
#undef CIN_VEC_BYTES
#undef CIN_STREAM_f
#undef CIN_STREAM_d
