#version 450
// Batched mat-vec over Q5_K weights (see mm.glsl).
#define TYPE_Q5_K 1
#include "mm.glsl"
