#version 450
// Batched mat-vec over Q4_1 weights (see mm.glsl).
#define TYPE_Q4_1 1
#include "mm.glsl"
