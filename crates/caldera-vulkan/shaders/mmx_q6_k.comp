#version 450
// The grouped expert matmul over Q6_K weights (mmt.glsl with MMT_EXPERT).
#define TYPE_Q6_K 1
#define MMT_EXPERT 1
#include "mmt.glsl"
