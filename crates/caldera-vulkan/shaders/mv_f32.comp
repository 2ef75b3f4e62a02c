#version 450
// Decode mat-vec over F32 weights (see mv.glsl).
#define TYPE_F32 1
#include "mv.glsl"
