#version 450
// Batched mat-vec over Q4_K weights (see mm.glsl).
#define TYPE_Q4_K 1
#include "mm.glsl"
