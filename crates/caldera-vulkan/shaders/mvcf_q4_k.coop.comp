#version 450
// Batched decode mat-vec on cooperative matrices over Q4_K weights, the 16 x 16 x 16 /
// 32-lane build (see mvc.glsl; compiled by glslang, not glslc: build-shaders.sh).
#extension GL_GOOGLE_include_directive : require
#define TYPE_Q4_K 1
#define MVC_FIXED16 1
#include "mvc.glsl"
