#version 450
// The grouped expert matmul over Q8_0 weights (mmt.glsl with MMT_EXPERT).
#define TYPE_Q8_0 1
#define MMT_EXPERT 1
#include "mmt.glsl"
