#version 450
// Batched mat-vec over Q6_K weights (see mm.glsl).
#define TYPE_Q6_K 1
#include "mm.glsl"
