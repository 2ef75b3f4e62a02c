#version 450
// The grouped batched decode mat-vec on int8 activations over Q6_K weights as it was
// before issue 6 (block readers of mvqn_v1.glsl), emulated int8 dot products, for A/B runs
// (CALDERA_VK_MVQM_V1=1; see mvqn.glsl).
#define TYPE_Q6_K 1
#define USE_DOT 0
#define MVQN_GROUPED 1
#define MVQN_V1 1
#include "mvqn.glsl"
