#version 450
// Batched mat-vec over Q5_1 weights (see mm.glsl).
#define TYPE_Q5_1 1
#include "mm.glsl"
