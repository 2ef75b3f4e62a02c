#version 450
// Decode mat-vec over F16 weights (see mv.glsl).
#define TYPE_F16 1
#include "mv.glsl"
