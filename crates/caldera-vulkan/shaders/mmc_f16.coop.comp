#version 450
// Tiled prefill matmul on cooperative matrices over F16 weights (see mmc.glsl;
// compiled by glslang, not glslc: build-shaders.sh).
#extension GL_GOOGLE_include_directive : require
#define TYPE_F16 1
#include "mmc.glsl"
