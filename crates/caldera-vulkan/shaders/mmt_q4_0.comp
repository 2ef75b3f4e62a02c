#version 450
// Tiled prefill matmul over Q4_0 weights (see mmt.glsl).
#define TYPE_Q4_0 1
#include "mmt.glsl"
