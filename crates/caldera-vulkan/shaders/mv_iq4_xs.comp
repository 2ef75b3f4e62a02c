#version 450
// Decode mat-vec over IQ4_XS weights (see mv.glsl).
#define TYPE_IQ4_XS 1
#include "mv.glsl"
