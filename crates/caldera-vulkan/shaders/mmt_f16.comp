#version 450
// Tiled prefill matmul over F16 weights (see mmt.glsl).
#define TYPE_F16 1
#include "mmt.glsl"
