#version 450
// Tiled prefill matmul over Q4_1 weights (see mmt.glsl).
#define TYPE_Q4_1 1
#include "mmt.glsl"
