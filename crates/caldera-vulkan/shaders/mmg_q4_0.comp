#version 450
// Batched mat-vec over Q4_0 weights with the GLU input (see mm.glsl).
#define TYPE_Q4_0 1
#define MM_GLU 1
#include "mm.glsl"
