#version 450
// Tiled prefill matmul over Q5_1 weights (see mmt.glsl).
#define TYPE_Q5_1 1
#include "mmt.glsl"
