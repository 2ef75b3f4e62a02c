#version 450
// Decode mat-vec over Q4_K weights (see mv.glsl).
#define TYPE_Q4_K 1
#include "mv.glsl"
