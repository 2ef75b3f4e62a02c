#version 450
// Decode gate|up mat-vec with the GLU over Q4_K weights (see mv.glsl).
#define TYPE_Q4_K 1
#define MVG 1
#include "mv.glsl"
