#version 450
// The grouped expert matmul over Q5_1 weights (mmt.glsl with MMT_EXPERT).
#define TYPE_Q5_1 1
#define MMT_EXPERT 1
#include "mmt.glsl"
