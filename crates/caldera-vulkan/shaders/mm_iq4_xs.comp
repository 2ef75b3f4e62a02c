#version 450
// Batched mat-vec over IQ4_XS weights (see mm.glsl).
#define TYPE_IQ4_XS 1
#include "mm.glsl"
