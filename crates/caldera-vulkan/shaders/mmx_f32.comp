#version 450
// The grouped expert matmul over F32 weights (mmt.glsl with MMT_EXPERT).
#define TYPE_F32 1
#define MMT_EXPERT 1
#include "mmt.glsl"
