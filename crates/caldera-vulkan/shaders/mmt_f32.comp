#version 450
// Tiled prefill matmul over F32 weights (see mmt.glsl).
#define TYPE_F32 1
#include "mmt.glsl"
