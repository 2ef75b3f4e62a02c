#version 450
// Batched mat-vec over BF16 weights (see mm.glsl).
#define TYPE_BF16 1
#include "mm.glsl"
