#version 450
// Batched mat-vec over Q8_0 weights (see mm.glsl).
#define TYPE_Q8_0 1
#include "mm.glsl"
