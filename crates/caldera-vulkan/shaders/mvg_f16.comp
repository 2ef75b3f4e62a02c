#version 450
// Decode gate|up mat-vec with the GLU over F16 weights (see mv.glsl).
#define TYPE_F16 1
#define MVG 1
#include "mv.glsl"
