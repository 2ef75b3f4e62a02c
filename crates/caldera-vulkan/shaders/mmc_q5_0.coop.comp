#version 450
// Tiled prefill matmul on cooperative matrices over Q5_0 weights (see mmc.glsl;
// compiled by glslang, not glslc: build-shaders.sh).
#extension GL_GOOGLE_include_directive : require
#define TYPE_Q5_0 1
#include "mmc.glsl"
