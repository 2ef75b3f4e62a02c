#version 450
// MoE router mat-vec over F32 weights whose last workgroup routes the token (see mv.glsl's MV_ROUTE, route.glsl).
#define TYPE_F32 1
#define MV_ROUTE 1
#include "mv.glsl"
