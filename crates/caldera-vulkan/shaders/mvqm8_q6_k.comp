#version 450
// Batched decode mat-vec on int8 activations over Q6_K weights, 8 rows x column
// groups of 8 with one reduction pass, int8 dot products (CALDERA_VK_MVQM_ROWS=8; see mvqn.glsl).
#define TYPE_Q6_K 1
#define USE_DOT 1
#define MVQN_GROUPED 1
#define MVQN_NRB 8
#include "mvqn.glsl"
