#version 450
// Tiled prefill matmul over Q8_0 weights (see mmt.glsl).
#define TYPE_Q8_0 1
#include "mmt.glsl"
