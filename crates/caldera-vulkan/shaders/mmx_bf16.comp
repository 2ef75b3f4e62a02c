#version 450
// The grouped expert matmul over BF16 weights (mmt.glsl with MMT_EXPERT).
#define TYPE_BF16 1
#define MMT_EXPERT 1
#include "mmt.glsl"
