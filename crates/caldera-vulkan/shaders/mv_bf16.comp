#version 450
// Decode mat-vec over BF16 weights (see mv.glsl).
#define TYPE_BF16 1
#include "mv.glsl"
