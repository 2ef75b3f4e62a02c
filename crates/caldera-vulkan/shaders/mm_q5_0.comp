#version 450
// Batched mat-vec over Q5_0 weights (see mm.glsl).
#define TYPE_Q5_0 1
#include "mm.glsl"
