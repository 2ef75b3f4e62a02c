#version 450
// Batched mat-vec over F16 weights (see mm.glsl).
#define TYPE_F16 1
#include "mm.glsl"
