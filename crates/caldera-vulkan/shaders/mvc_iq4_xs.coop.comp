#version 450
// Batched decode mat-vec on cooperative matrices over IQ4_XS weights (see mvc.glsl;
// compiled by glslang, not glslc: build-shaders.sh).
#extension GL_GOOGLE_include_directive : require
#define TYPE_IQ4_XS 1
#include "mvc.glsl"
