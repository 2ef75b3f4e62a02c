#version 450
// Decode mat-vec over Q6_K weights (see mv.glsl).
#define TYPE_Q6_K 1
#include "mv.glsl"
