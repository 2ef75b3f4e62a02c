#version 450
// Expert mat-vec over IQ4_XS weights, the experts chosen by the router (see expert.glsl, mv.glsl).
#define TYPE_IQ4_XS 1
#define MV_EXPERT 1
#include "mv.glsl"
