#version 450
// Batched mat-vec over IQ4_XS weights with the GLU input (see mm.glsl).
#define TYPE_IQ4_XS 1
#define MM_GLU 1
#include "mm.glsl"
