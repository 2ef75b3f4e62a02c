#version 450
// The grouped expert matmul over IQ4_XS weights (mmt.glsl with MMT_EXPERT).
#define TYPE_IQ4_XS 1
#define MMT_EXPERT 1
#include "mmt.glsl"
