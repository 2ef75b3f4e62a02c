#version 450
// Decode gate|up mat-vec with the GLU over IQ4_XS weights (see mv.glsl).
#define TYPE_IQ4_XS 1
#define MVG 1
#include "mv.glsl"
