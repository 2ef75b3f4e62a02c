#version 450
// Decode gate|up mat-vec with the GLU over Q4_1 weights (see mv.glsl).
#define TYPE_Q4_1 1
#define MVG 1
#include "mv.glsl"
