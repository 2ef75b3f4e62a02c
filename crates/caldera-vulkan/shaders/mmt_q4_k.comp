#version 450
// Tiled prefill matmul over Q4_K weights (see mmt.glsl).
#define TYPE_Q4_K 1
#include "mmt.glsl"
