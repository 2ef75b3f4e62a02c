#version 450
// Batched mat-vec over Q4_0 weights (see mm.glsl).
#define TYPE_Q4_0 1
#include "mm.glsl"
