#version 450
// Tiled prefill matmul over Q5_K weights (see mmt.glsl).
#define TYPE_Q5_K 1
#include "mmt.glsl"
