#version 450
// Batched decode mat-vec on cooperative matrices over Q5_0 weights (see mvc.glsl;
// compiled by glslang, not glslc: build-shaders.sh).
#extension GL_GOOGLE_include_directive : require
#define TYPE_Q5_0 1
#include "mvc.glsl"
