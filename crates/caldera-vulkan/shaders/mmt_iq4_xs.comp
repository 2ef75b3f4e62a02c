#version 450
// Tiled prefill matmul over IQ4_XS weights (see mmt.glsl).
#define TYPE_IQ4_XS 1
#include "mmt.glsl"
