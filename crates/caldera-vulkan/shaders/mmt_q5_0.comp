#version 450
// Tiled prefill matmul over Q5_0 weights (see mmt.glsl).
#define TYPE_Q5_0 1
#include "mmt.glsl"
