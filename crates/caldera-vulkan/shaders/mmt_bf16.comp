#version 450
// Tiled prefill matmul over BF16 weights (see mmt.glsl).
#define TYPE_BF16 1
#include "mmt.glsl"
