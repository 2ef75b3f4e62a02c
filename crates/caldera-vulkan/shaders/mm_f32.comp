#version 450
// Batched mat-vec over F32 weights (see mm.glsl).
#define TYPE_F32 1
#include "mm.glsl"
