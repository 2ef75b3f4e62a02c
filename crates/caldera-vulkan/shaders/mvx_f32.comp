#version 450
// Expert mat-vec over F32 weights, the experts chosen by the router (see expert.glsl, mv.glsl).
#define TYPE_F32 1
#define MV_EXPERT 1
#include "mv.glsl"
