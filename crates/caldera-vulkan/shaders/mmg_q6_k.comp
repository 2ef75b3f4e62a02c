#version 450
// Batched mat-vec over Q6_K weights with the GLU input (see mm.glsl).
#define TYPE_Q6_K 1
#define MM_GLU 1
#include "mm.glsl"
