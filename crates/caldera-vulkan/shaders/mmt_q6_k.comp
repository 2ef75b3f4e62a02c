#version 450
// Tiled prefill matmul over Q6_K weights (see mmt.glsl).
#define TYPE_Q6_K 1
#include "mmt.glsl"
