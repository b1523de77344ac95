/* One instruction set's instantiation (CIN_IT, CIN_UT: the signed and unsigned integer types
 * of CIN_T's size, for the lane masks and bit tricks of the activations): expects CIN_ISA
 * (name suffix), CIN_VEC_BYTES and, for non-temporal stores, CIN_STREAM_f / CIN_STREAM_d;
 * undefines them at the end. */
#define CIN_T float
#define CIN_TS f
#define CIN_TBYTES 4
#define CIN_IT int32_t
#define CIN_UT uint32_t
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_TS
#undef CIN_TBYTES
#undef CIN_IT
#undef CIN_UT

#define CIN_T double
#define CIN_TS d
#define CIN_TBYTES 8
#define CIN_IT int64_t
#define CIN_UT uint64_t
#include "cinstnorm_kernels_impl.h"
#undef CIN_T
#undef CIN_TS
#undef CIN_TBYTES
#undef CIN_IT
#undef CIN_UT

#undef CIN_ISA
#undef CIN_VEC_BYTES
#undef CIN_STREAM_f
#undef CIN_STREAM_d
