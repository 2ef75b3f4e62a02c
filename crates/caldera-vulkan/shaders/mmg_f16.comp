#version 450
// Batched mat-vec over F16 weights with the GLU input (see mm.glsl).
#define TYPE_F16 1
#define MM_GLU 1
#include "mm.glsl"
