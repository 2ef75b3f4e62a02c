#version 450
// Batched mat-vec over Q5_0 weights with the GLU input (see mm.glsl).
#define TYPE_Q5_0 1
#define MM_GLU 1
#include "mm.glsl"
